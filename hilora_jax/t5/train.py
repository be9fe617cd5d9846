"""T5 LoRA training: the trainer's (`hilora_jax.lora.train`) objective for an encoder-decoder.

`lora.train.train_lora` owns everything else (targets, initialisation, AdamW + schedule, batch
order, the jitted step, `save_peft`); this module only says how a batch looks and what the loss
is. The prompt is the encoder input (right-padded to one length bucket; T5 positions are
relative, padded keys are masked), the answer the decoder target with teacher forcing, as
transformers' `labels` loss builds it: `[decoder_start] + answer[:-1]` in, `answer` as labels,
right-padded (the decoder is causal, so padding after the answer changes nothing before it). The
loss is the trainer's `masked_nll` over the answer tokens: the model's teacher-forced logits
(`T5ForConditionalGeneration.__call__`, the adapter as its `LoraHook`) through
`model.layers.log_softmax_gather`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from hilora_jax.inference import pad_batch
from hilora_jax.lora.train import bucket16, masked_nll
from hilora_jax.model.layers import log_softmax_gather
from hilora_jax.t5.config import T5Config


class Seq2SeqObjective:
    """Encoder input = prompt ids, decoder target = answer ids (`lora.train.training_pairs`)."""

    def __init__(self, cfg: T5Config, examples: Sequence, pairs, pad: int, max_len: int):
        for i, (p, a) in enumerate(pairs):
            if max(len(p), len(a)) > max_len:
                raise ValueError(f"task {examples[i].task!r} example {i}: prompt {len(p)} / answer "
                                 f"{len(a)} tokens > max_len={max_len}")
        self.pairs, self.pad, self.start_id = pairs, pad, cfg.decoder_start_token_id
        self.enc_len = bucket16(max(len(p) for p, _ in pairs), max_len)
        self.dec_len = bucket16(max(len(a) for _, a in pairs), max_len)

    def prepare(self, model, graphdef, state, batch_size: int) -> None:
        """Nothing to precompute (every step runs the whole model)."""

    def batch(self, idx) -> tuple:
        """`(ids, mask [B, Te], decoder ids, decoder mask, labels [B, Td])`, numpy."""
        ids, mask = pad_batch([self.pairs[i][0] for i in idx], self.enc_len, self.pad,
                              side="right")
        labels, dec_mask = pad_batch([self.pairs[i][1] for i in idx], self.dec_len, self.pad,
                                     side="right")
        dec_ids = np.concatenate([np.full((len(idx), 1), self.start_id, labels.dtype),
                                  labels[:, :-1]], axis=1)
        return ids, mask, dec_ids, dec_mask, labels

    def loss(self, adapter, model, ids, mask, dec_ids, dec_mask, labels):
        logits = model(ids, mask, dec_ids, dec_mask, lora=adapter)  # B Td V, float32
        return masked_nll(log_softmax_gather(logits, labels), dec_mask)
