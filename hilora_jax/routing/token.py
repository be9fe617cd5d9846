"""Token level of HiLoRA: which rank-one components (ROCs) fire (method §3), and the roc-fixed baseline.

Called inside every adapted projection with that module's ROC responses ``u_ij(t) = a_ij . x_t``
of the sequence's candidate LoRAs, so decisions differ per layer, module and token. Gates are
{0, 1} masks in ``u``'s dtype; the caller forms ``kappa * sum_i s_i sum_j gate_ij u_ij b_ij``.

Shape letters: the legend in ``hilora_jax.model.projections`` (R is padded to the max rank; padding
is marked by ``roc_valid = False``).

Top-n selection (``topn_gates``) keeps, per token and candidate, the ``n_i`` valid ROCs with the
largest ``|u|``; equal ``|u|``: the lower ROC index wins. ``n`` is an *array* (it varies per row and
comes from the sequence stage), so one compiled program serves every decision. Two exact
implementations, equal on every input:

* ``pairwise`` (default): the rank of ROC j is the number of valid ROCs that beat it, an
  ``[..., R, R]`` comparison reduced over one axis: no sort, which maps well to TPU vector units for
  the small R of LoRAs (8-64); XLA fuses the compare into the reduction.
* ``sort``: ranks from a stable argsort (O(R log R) work and ``[..., R]`` memory; better for large R).

``roc_fixed_gates`` is the "HiLoRA-ROC" baseline: per token, the global top-``budget`` ``|u|`` over
all valid ROCs of the whole pool (``lax.top_k``: equal values, lower flat ``a * R + j`` index first).
"""

# jaxtyping shape strings are not Python expressions (ruff F722 false positive).
# ruff: noqa: F722

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

KAPPA_MODES = ("none", "sqrt", "mean", "sqrt-eff", "mean-eff")


def roc_ranks(
    mag: Float[Array, "... R"], valid: Bool[Array, "... R"], method: str = "pairwise"
) -> Int[Array, "... R"]:
    """Position of each valid entry in descending ``mag`` order (ties: lower index first).

    Invalid entries get ranks after all valid ones. ``mag`` must be >= 0 on valid entries.
    """
    key = jnp.where(valid, mag, -1.0)
    r = key.shape[-1]
    if method == "sort":
        order = jnp.argsort(-key, axis=-1, stable=True)
        return jnp.argsort(order, axis=-1, stable=True).astype(jnp.int32)
    if method != "pairwise":
        raise ValueError(f"method must be 'pairwise' or 'sort', got {method!r}")
    idx = jnp.arange(r)
    kj, ki = key[..., :, None], key[..., None, :]  # j beats i?   [..., R, R]
    beats = (kj > ki) | ((kj == ki) & (idx[:, None] < idx[None, :]))
    return beats.sum(-2).astype(jnp.int32)


def topn_gates(
    u: Float[Array, "B T C R"],
    n: Int[Array, "B C"],
    roc_valid: Bool[Array, "B C R"],
    *,
    method: str = "pairwise",
) -> Float[Array, "B T C R"]:
    """Per token and candidate, gate 1 on the ``n[b, c]`` valid ROCs with the largest ``|u|``."""
    valid = jnp.asarray(roc_valid, bool)[:, None]  # [B, 1, C, R]
    rank = roc_ranks(jnp.abs(u), valid, method)  # [B, T, C, R]
    keep = valid & (rank < jnp.asarray(n, jnp.int32)[:, None, :, None])
    return keep.astype(u.dtype)


def kappa(n: Int[Array, "B C"], mode: str = "sqrt") -> Float[Array, " B"]:
    """Output normalisation [choice]: with L = #{i : n_i > 0}, ``none`` -> 1, ``sqrt`` ->
    1/sqrt(L), ``mean`` -> 1/L. The ``-eff`` modes count *effective* LoRAs by their ROC shares,
    ``L_eff = (sum_i n_i)^2 / sum_i n_i^2`` (1 for a single LoRA, L for L equal shares, ~1 when one
    LoRA holds almost all ROCs), so a decisive expert is not shrunk: ``sqrt-eff`` -> 1/sqrt(L_eff),
    ``mean-eff`` -> 1/L_eff. Rows with L = 0 get 1 (they add nothing anyway)."""
    if mode not in KAPPA_MODES:
        raise ValueError(f"kappa mode must be one of {KAPPA_MODES}, got {mode!r}")
    n = jnp.asarray(n)
    if mode.endswith("-eff"):
        nf = n.astype(jnp.float32)
        tot, sq = jnp.sum(nf, -1), jnp.sum(nf * nf, -1)
        count = jnp.where(sq > 0, tot * tot / jnp.maximum(sq, 1.0), 1.0)
    else:
        count = jnp.maximum(jnp.sum(n > 0, -1), 1).astype(jnp.float32)  # [B]
    if mode == "none":
        return jnp.ones_like(count)
    if mode.startswith("sqrt"):
        return jax.lax.rsqrt(count)
    return 1.0 / count


def roc_fixed_gates(
    u: Float[Array, "B T A R"],
    roc_valid: Bool[Array, "A R"] | Bool[Array, "B A R"],
    budget: int = 24,
) -> Float[Array, "B T A R"]:
    """roc-fixed baseline: per token, gate 1 on the global top-``budget`` valid ``|u|`` of the pool.

    ``budget`` is static; with fewer valid ROCs than ``budget`` all valid ones are kept.
    """
    b, t, a, r = u.shape
    valid = jnp.broadcast_to(jnp.asarray(roc_valid, bool), (b, a, r))[:, None]  # [B, 1, A, R]
    valid = jnp.broadcast_to(valid, u.shape).reshape(b, t, a * r)
    key = jnp.where(valid, jnp.abs(u).reshape(b, t, a * r), -jnp.inf)  # [B, T, A*R]
    kk = min(int(budget), a * r)
    _, idx = jax.lax.top_k(key, kk)  # [B, T, kk]
    gates = jnp.put_along_axis(
        jnp.zeros(key.shape, u.dtype), idx, jnp.ones((), u.dtype), axis=-1, inplace=False
    )
    return (gates * valid).reshape(b, t, a, r)
