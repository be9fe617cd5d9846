"""Tiny random HF T5 models written to temp dirs (distinct dims, so a swapped axis fails)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import transformers as tf

# d_model != heads * d_kv, d_ff distinct, more encoder than decoder-distinct block counts
VOCAB, D_MODEL, D_KV, D_FF, HEADS = 67, 40, 7, 52, 5
ENC_LAYERS, DEC_LAYERS = 2, 3
BUCKETS, MAX_DIST = 12, 24  # small, so the long-distance (log) buckets are exercised

VARIANTS = {
    "v1.0": dict(feed_forward_proj="relu"),  # ReLU, tied head, d_model**-0.5 scaling
    "v1.1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),  # FLAN-T5 layout
}


def tiny_config(variant: str = "v1.0", **extra) -> tf.T5Config:
    kw = dict(vocab_size=VOCAB, d_model=D_MODEL, d_kv=D_KV, d_ff=D_FF, num_layers=ENC_LAYERS,
              num_decoder_layers=DEC_LAYERS, num_heads=HEADS,
              relative_attention_num_buckets=BUCKETS, relative_attention_max_distance=MAX_DIST,
              decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, dropout_rate=0.0)
    kw.update(VARIANTS[variant])
    kw.update(extra)
    return tf.T5Config(**kw)


def make_hf_t5(path, variant: str = "v1.0", *, seed: int = 0, layout: str = "4.x",
               **cfg_kw) -> tf.T5ForConditionalGeneration:
    """Save a tiny random `T5ForConditionalGeneration` to `path`; returns it (eval, fp32).

    v1.1 gets its own random `lm_head`. `layout="4.x"` writes the config as transformers 4.x
    did (`tie_word_embeddings: false` for an untied head, no `scale_decoder_outputs`);
    `"5.x"` keeps what the installed transformers 5 writes (`tie_word_embeddings: true`,
    `scale_decoder_outputs`), so an untied head is only visible in the checkpoint.
    """
    torch.manual_seed(seed)
    model = tf.T5ForConditionalGeneration(tiny_config(variant, **cfg_kw)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layer_norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    untied = variant == "v1.1"
    if untied:  # transformers 5 always builds the head tied; untie it as a v1.1 checkpoint is
        model.lm_head.weight = torch.nn.Parameter(0.05 * torch.randn(VOCAB, D_MODEL, generator=g))
        model.config.tie_word_embeddings = False
    model.save_pretrained(str(path))
    cfg_path = Path(path) / "config.json"
    cfg = json.loads(cfg_path.read_text())
    if layout == "4.x":
        cfg.pop("scale_decoder_outputs", None)
        cfg["tie_word_embeddings"] = not untied
        cfg["transformers_version"] = "4.46.3"
    else:
        cfg["tie_word_embeddings"] = True
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return model


def padded(rng: np.random.Generator, lengths, total: int, *, side: str = "right", low: int = 2):
    ids = np.zeros((len(lengths), total), np.int64)
    mask = np.zeros((len(lengths), total), np.int64)
    for i, n in enumerate(lengths):
        toks = rng.integers(low, VOCAB, size=n)
        if side == "left":
            ids[i, total - n:], mask[i, total - n:] = toks, 1
        else:
            ids[i, :n], mask[i, :n] = toks, 1
    return ids, mask


def hf_logits(model, ids, mask, dec_ids, dec_mask) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                     decoder_input_ids=torch.as_tensor(dec_ids),
                     decoder_attention_mask=torch.as_tensor(dec_mask)).logits.numpy()
