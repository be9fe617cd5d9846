"""Sentence embeddings from the base LLM itself (no extra model): mean-pooled hidden states.

`LLMEmbedder(engine, tokenizer, layer)` runs the frozen base model (no LoRA) up to `layer`
(0 = token embeddings) and mean-pools the hidden states over the real (non-padding) tokens.
Texts are padded on the right into length buckets, so a text's embedding does not depend on its
batch-mates or on the bucket (padding is masked in attention and in the pooling).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from hilora_jax.inference import Engine, bucket_length, pad_batch


class LLMEmbedder:
    def __init__(self, engine: Engine, tokenizer, layer: int | None = None, *,
                 max_length: int = 256, batch_size: int = 16):
        cfg = engine.config
        self.engine = engine
        self.tokenizer = tokenizer
        self.layer = cfg.num_layers // 2 if layer is None else int(layer)
        if not 0 <= self.layer <= cfg.num_layers:
            raise ValueError(f"layer {self.layer} is outside 0..{cfg.num_layers}")
        self.dim = cfg.hidden_size
        self.max_length = max_length
        self.batch_size = batch_size
        self.name = f"llm-layer{self.layer}"

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        out = np.zeros((len(texts), self.dim), np.float32)
        for s in range(0, len(texts), self.batch_size):
            chunk = texts[s: s + self.batch_size]
            ids = [self.tokenizer(t)["input_ids"][: self.max_length] or [0] for t in chunk]
            t = bucket_length(max(map(len, ids)))
            arr, mask = pad_batch(ids, t, 0, side="right")
            _, hidden = self.engine.forward(arr, mask, logits_at="none", hidden_layer=self.layer)
            h = np.asarray(hidden, np.float32)  # B T D
            m = mask[..., None].astype(np.float32)
            out[s: s + len(chunk)] = (h * m).sum(1) / np.maximum(m.sum(1), 1.0)
        return out
