"""The embedder protocol and an embedder over caller-supplied vectors.

HiLoRA's routers only need "texts in, float32 matrix ``[n, d]`` out". Anything with that call and a
``dim`` attribute is an `Embedder`: the Flax sentence-transformers port (`SentenceEmbedder`), the
base-LLM mean-pool embedder, or `PrecomputedEmbedder` for embeddings computed elsewhere (cached to disk,
from an API, from a test). The protocol is structural (``typing.Protocol``), so no inheritance is needed.

`PrecomputedEmbedder` is strict on purpose: a missing text or a non-finite vector would silently corrupt
the Gaussian likelihoods the router computes, so both raise, naming the text / row.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Protocol, runtime_checkable

import numpy as np

ArrayLike = np.ndarray | Sequence[float]


@runtime_checkable
class Embedder(Protocol):
    """Maps a list of texts to a float32 matrix ``[n, dim]`` (row ``i`` embeds ``texts[i]``)."""

    dim: int

    def __call__(self, texts: Sequence[str]) -> np.ndarray: ...


def _short(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


class PrecomputedEmbedder:
    """Embeds by lookup in a ``text -> vector`` mapping, or by calling ``text -> vector``.

    Args:
        source: a mapping from text to a 1-D vector, or a callable returning one (``None`` = missing).
        dim: embedding size; inferred from a mapping, required for a callable.

    Raises ``KeyError`` naming the text when a vector is missing, ``ValueError`` naming the row and text
    when a vector has the wrong shape or holds NaN/inf.
    """

    def __init__(
        self,
        source: Mapping[str, ArrayLike] | Callable[[str], ArrayLike | None],
        dim: int | None = None,
    ):
        if isinstance(source, Mapping):
            if not source:
                raise ValueError("PrecomputedEmbedder needs a non-empty mapping")
            first = np.asarray(next(iter(source.values())))
            if first.ndim != 1:
                raise ValueError(f"mapping values must be 1-D vectors, got shape {first.shape}")
            inferred = int(first.shape[0])
            if dim is not None and dim != inferred:
                raise ValueError(f"dim={dim} but the mapping's vectors have shape {first.shape}")
            self._lookup: Callable[[str], ArrayLike | None] = source.get
            self.dim = inferred
        elif callable(source):
            if dim is None:
                raise ValueError("PrecomputedEmbedder over a callable needs dim=")
            self._lookup = source
            self.dim = int(dim)
        else:
            raise TypeError(f"source must be a mapping or a callable, got {type(source).__name__}")

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        if isinstance(texts, str):
            raise TypeError("pass a list of texts, not a single string")
        out = np.empty((len(texts), self.dim), np.float32)
        for i, text in enumerate(texts):
            vec = self._lookup(text)
            if vec is None:
                raise KeyError(f"no precomputed embedding for text {_short(text)} (row {i})")
            arr = np.asarray(vec, dtype=np.float32)
            if arr.shape != (self.dim,):
                raise ValueError(
                    f"embedding for row {i} (text {_short(text)}) has shape {arr.shape}, expected ({self.dim},)"
                )
            if not np.all(np.isfinite(arr)):
                raise ValueError(f"embedding for row {i} (text {_short(text)}) contains NaN or inf")
            out[i] = arr
        return out
