"""Pure math of a Llama-family decoder, written to reproduce transformers numerics exactly.

Shape letters in einsum strings and shape comments: the legend in `hilora_jax.model.projections`.

Numerics follow HF: RMSNorm in float32 then cast back before the weight multiply; rotate-half
RoPE with cos/sin computed in float32 and cast to the activation dtype; query scaling by
head_dim**-0.5 inside the attention; softmax in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

_NEG = -1e30  # finite "minus infinity" so fully-masked rows (padding queries) never yield NaN


def rms_norm(x: Float[Array, "... D"], weight: Float[Array, " D"], eps: float) -> Array:
    """HF `LlamaRMSNorm`: normalise in float32, cast back, then scale."""
    dtype = x.dtype
    x32 = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    y = (x32 * jax.lax.rsqrt(var + eps)).astype(dtype)
    return weight.astype(dtype) * y


def rope_cos_sin(
    positions: Int[Array, "B T"], inv_freq: Float[Array, " H2"], dtype
) -> tuple[Array, Array]:
    """cos, sin `[B, T, H]` for rotate-half RoPE (float32 maths, cast to `dtype`)."""
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq.astype(jnp.float32)  # B T H/2
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # B T H
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: Float[Array, "B T N H"], cos: Array, sin: Array) -> Array:
    """Rotate-half RoPE; `cos`/`sin` are `[B, T, H]` and broadcast over heads."""
    h = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., h:], x[..., :h]], axis=-1)
    return x * cos[:, :, None, :] + rot * sin[:, :, None, :]


def attention_mask(
    q_pos: Int[Array, "B T"],
    q_slot: Int[Array, " T"],
    k_pos: Int[Array, "B S"],
    k_valid: Bool[Array, "B S"],
    sliding_window: int | None = None,
) -> Bool[Array, "B T S"]:
    """Which key slots each query may attend to.

    Causality is by cache slot (slot s <= query slot t; left padding keeps slots aligned), padding
    by `k_valid`, and the optional sliding window by position distance (HF: q_pos - k_pos < W).
    """
    s = k_pos.shape[1]
    causal = jnp.arange(s)[None, None, :] <= q_slot[None, :, None]  # 1 T S
    mask = causal & k_valid[:, None, :]  # B T S
    if sliding_window is not None:
        mask &= (q_pos[:, :, None] - k_pos[:, None, :]) < sliding_window
    return mask


# Query-blocked attention: when a call's fp32 scores (batch x heads x queries x keys) exceed
# ATTN_SCORE_BUDGET elements, the queries are split into at most ATTN_MAX_BLOCKS static blocks, so
# a long prompt never holds the whole [B, N, T, S] score tensor at once. The blocks are unrolled
# (not a loop): XLA's cost analysis then counts all of them, and its scheduler still frees each
# block's scores before the next one.
ATTN_SCORE_BUDGET = 1 << 27
ATTN_MAX_BLOCKS = 4


def _attention_block(qg, k, v, mask, scale):
    """qg `[B, T, K, G, H]`, mask `[B, T, S]` -> `[B, T, K, G, H]` (HF eager numerics)."""
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k, preferred_element_type=jnp.float32)
    scores = scores * scale
    scores = jnp.where(mask[:, None, None, :, :], scores, _NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)  # B K G T S
    return jnp.einsum("BKGTS,BSKH->BTKGH", probs, v)


def attention_chunk(b: int, n: int, t: int, s: int, budget: int | None = None,
                    max_blocks: int | None = None) -> int:
    """Queries per block: all `t` when `b*n*t*s <= budget` (default `ATTN_SCORE_BUDGET`, read at
    trace time); else the largest power of two (>= 16) under the budget, but at least
    `ceil(t / max_blocks)` (default `ATTN_MAX_BLOCKS`) rounded up to a multiple of 16."""
    budget = ATTN_SCORE_BUDGET if budget is None else budget
    max_blocks = ATTN_MAX_BLOCKS if max_blocks is None else max_blocks
    if b * n * t * s <= budget:
        return t
    c = 16
    while c * 2 * b * n * s <= budget and c * 2 < t:
        c *= 2
    floor = -(-t // max_blocks)
    return min(t, max(c, -(-floor // 16) * 16))


def dot_product_attention(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B S K H"],
    v: Float[Array, "B S K H"],
    mask: Bool[Array, "B T S"],
    *,
    chunk: int | None = None,
) -> Float[Array, "B T N H"]:
    """Grouped-query attention (MHA when K == N, MQA when K == 1), HF eager numerics.

    Long prompts are processed in blocks of `chunk` queries (default `attention_chunk`): each
    block's softmax sees every key, so every query row is computed exactly as before; only the
    peak memory of the fp32 scores drops from `[B, N, T, S]` to `[B, N, chunk, S]`.
    """
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    scale = h**-0.5
    qg = q.reshape(b, t, kh, n // kh, h)  # B T K G H  (q head = k*G + g, as HF repeat_kv)
    c = chunk or attention_chunk(b, n, t, s)
    if c >= t:
        return _attention_block(qg, k, v, mask, scale).reshape(b, t, n, h)
    outs = [_attention_block(qg[:, i:i + c], k, v, mask[:, i:i + c], scale)
            for i in range(0, t, c)]
    return jnp.concatenate(outs, axis=1).reshape(b, t, n, h)


def attention_then_write(
    q: Float[Array, "B T N H"],
    k_cache: Float[Array, "B S K H"],
    v_cache: Float[Array, "B S K H"],
    k_new: Float[Array, "B T K H"],
    v_new: Float[Array, "B T K H"],
    mask: Bool[Array, "B T S"],
    write_at: Int[Array, ""],
):
    """Attention of a few new queries over the cache *before* it is updated plus this call's own
    keys, then the cache update: `(out [B, T, N, H], k_cache', v_cache')`.

    Same maths as writing first and attending over the updated cache (`mask` is that cache's
    mask, slots `write_at .. write_at+T-1` being this call's keys): one softmax over the old
    slots (those slots masked out) and the new keys, normalised together in float32. Used
    when `llama.DECODE_ATTENTION == "then_write"` (not the default): when attention reads the cache
    the same step has just written, XLA:TPU may stage the written cache on chip and copy every
    layer's whole cache back to HBM each decode step (seen with the `gathered` HiLoRA hook,
    `docs/aot_decode_bytes.md`); updating after the reads keeps the update in place in HBM.
    """
    b, t, n, h = q.shape
    kh = k_cache.shape[2]
    qg = q.reshape(b, t, kh, n // kh, h)  # B T K G H
    scale = h**-0.5
    slots = jnp.arange(k_cache.shape[1])
    fresh = (slots >= write_at) & (slots < write_at + t)  # S: overwritten by this call
    mask_old = mask & ~fresh[None, None, :]
    mask_new = jax.lax.dynamic_slice_in_dim(mask, write_at, t, axis=2)  # B T T
    kc, vc = k_cache.astype(q.dtype), v_cache.astype(q.dtype)
    kn, vn = k_new.astype(q.dtype), v_new.astype(q.dtype)
    s_old = jnp.einsum("BTKGH,BSKH->BKGTS", qg, kc, preferred_element_type=jnp.float32) * scale
    s_new = jnp.einsum("BTKGH,BSKH->BKGTS", qg, kn, preferred_element_type=jnp.float32) * scale
    s_old = jnp.where(mask_old[:, None, None], s_old, _NEG)
    s_new = jnp.where(mask_new[:, None, None], s_new, _NEG)
    top = jnp.maximum(s_old.max(-1, keepdims=True), s_new.max(-1, keepdims=True))
    p_old, p_new = jnp.exp(s_old - top), jnp.exp(s_new - top)
    den = p_old.sum(-1, keepdims=True) + p_new.sum(-1, keepdims=True)
    p_old, p_new = (p_old / den).astype(vc.dtype), (p_new / den).astype(vc.dtype)
    out = (jnp.einsum("BKGTS,BSKH->BTKGH", p_old, vc, preferred_element_type=jnp.float32)
           + jnp.einsum("BKGTS,BSKH->BTKGH", p_new, vn, preferred_element_type=jnp.float32))
    at = (0, write_at, 0, 0)
    k_cache = jax.lax.dynamic_update_slice(k_cache, k_new.astype(k_cache.dtype), at)
    v_cache = jax.lax.dynamic_update_slice(v_cache, v_new.astype(v_cache.dtype), at)
    return out.astype(q.dtype).reshape(b, t, n, h), k_cache, v_cache


def swiglu(gate: Array, up: Array) -> Array:
    """`silu(gate) * up` (HF `LlamaMLP` with `hidden_act="silu"`)."""
    return jax.nn.silu(gate) * up


def log_softmax_gather(
    logits: Float[Array, "B T V"], targets: Int[Array, "B T"]
) -> Float[Array, "B T"]:
    """Log-probability of `targets` under `logits` (float32)."""
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(lp, targets[..., None], axis=-1)[..., 0]
