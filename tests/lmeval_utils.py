"""Shared pieces of the lm-eval backend tests (tests/test_lmeval.py: Llama, tests/test_t5_lmeval.py:
T5 against `HFLM(backend="seq2seq")`): random word strings, our backend and lm-eval's `hf` backend
built on the same saved dir, and the log-likelihood comparison."""

from __future__ import annotations

import numpy as np


def words(rng, lo: int, hi: int, vocab: int) -> str:
    """Between lo and hi - 1 random words of the word tokenizer (ids 4..vocab-1)."""
    return " ".join(f"w{k}" for k in rng.integers(4, vocab, size=int(rng.integers(lo, hi))))


def hilora_lm(model_dir, max_len: int, batch_size: int = 4):
    """Our backend as lm-eval's registry builds it from a model_args string."""
    from lm_eval.api.registry import get_model

    import hilora_jax.lmeval  # noqa: F401  (registers "hilora")

    return get_model("hilora").create_from_arg_string(
        f"model={model_dir},max_length={max_len}", {"batch_size": batch_size})


def hf_lm(model_dir, max_len: int, **kw):
    """lm-eval's own `hf` backend on the same dir, fp32 on CPU."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(model_dir), device="cpu", dtype="float32", batch_size=4,
                max_length=max_len, **kw)


def assert_ll_equal(ours, ref, atol: float = 1e-4):
    """(log-likelihood, is_greedy) pairs: values within atol, is_greedy identical."""
    assert len(ours) == len(ref)
    np.testing.assert_allclose([x[0] for x in ours], [x[0] for x in ref], atol=atol, rtol=0)
    assert [x[1] for x in ours] == [x[1] for x in ref]
