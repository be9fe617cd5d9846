"""Tiny random HF models written to temp dirs (distinct dims, so a swapped axis fails)."""

from __future__ import annotations

import numpy as np
import torch
import transformers as tf

VOCAB, HIDDEN, INTER, HEADS, HEAD_DIM = 61, 48, 40, 6, 8

FAMILIES = {
    "llama": tf.LlamaConfig,
    "mistral": tf.MistralConfig,
    "qwen2": tf.Qwen2Config,
    "qwen3": tf.Qwen3Config,
}


def tiny_config(family: str = "llama", *, kv_heads: int = 2, tie: bool = False, layers: int = 2,
                **extra) -> tf.PretrainedConfig:
    kw = dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=layers,
        num_attention_heads=HEADS, num_key_value_heads=kv_heads, head_dim=HEAD_DIM,
        max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=tie,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    if family == "mistral":
        kw["sliding_window"] = None
    kw.update(extra)
    return FAMILIES[family](**kw)


def randomize_(model: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> None:
    """Random weights everywhere (norm weights around 1, biases non-zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(scale * torch.randn(p.shape, generator=g))


def make_hf_model(path, family: str = "llama", *, seed: int = 0, **cfg_kw):
    """Save a tiny random `*ForCausalLM` to `path`; returns the torch model (eval, fp32)."""
    torch.manual_seed(seed)
    cfg = tiny_config(family, **cfg_kw)
    model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    randomize_(model, seed)
    model.eval()
    model.save_pretrained(str(path))
    return model


def padded_batch(rng: np.random.Generator, lengths, total: int, *, side: str = "left",
                 vocab: int = VOCAB):
    ids = np.zeros((len(lengths), total), np.int64)
    mask = np.zeros((len(lengths), total), np.int64)
    for i, n in enumerate(lengths):
        toks = rng.integers(3, vocab, size=n)
        if side == "left":
            ids[i, total - n:], mask[i, total - n:] = toks, 1
        else:
            ids[i, :n], mask[i, :n] = toks, 1
    return ids, mask


def hf_logits(model, ids, mask) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits.numpy()
