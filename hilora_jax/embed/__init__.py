"""Sentence embedders for HiLoRA's input routing.

HiLoRA scores each input against per-adapter Gaussians fitted in a sentence-embedding space. This
package supplies that space:

* `Embedder`: the protocol (``__call__(texts) -> float32 [n, dim]`` plus ``dim``).
* `SentenceEmbedder`: a BERT-family sentence-transformers checkpoint (default all-MiniLM-L6-v2) run in
  Flax, numerically matching ``SentenceTransformer.encode`` (see `sentence.py`, `bert.py`).
* `PrecomputedEmbedder`: embeddings supplied by the caller (a mapping or a function).
* `load_embedder`: one entry point for configs and command lines.
"""

from __future__ import annotations

import os

from hilora_jax.embed.base import Embedder, PrecomputedEmbedder
from hilora_jax.embed.sentence import SentenceEmbedder

__all__ = ["Embedder", "PrecomputedEmbedder", "SentenceEmbedder", "load_embedder"]


def load_embedder(spec: str | os.PathLike[str] | Embedder = "minilm") -> Embedder:
    """``"minilm"`` (default), a checkpoint directory, a HF Hub id, or an `Embedder` passed through."""
    if isinstance(spec, (str, os.PathLike)):
        return SentenceEmbedder.from_pretrained(spec)
    if isinstance(spec, Embedder):
        return spec
    raise TypeError(
        f"cannot make an embedder from {type(spec).__name__}: pass a name, a path or an Embedder"
    )
