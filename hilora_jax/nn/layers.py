"""Pure math of a Llama-family decoder, written to reproduce transformers numerics exactly.

Shape legend (used in every einsum string and shape comment in this package):
  B batch, T query tokens, S key slots (cache length), D embed, F mlp hidden, N query heads,
  K kv heads, G query heads per kv head (N = K*G), H head dim, V vocab, L layers,
  A adapters (LoRAs in a pool), R rank-one components per adapter, C candidate adapters.

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


def dot_product_attention(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B S K H"],
    v: Float[Array, "B S K H"],
    mask: Bool[Array, "B T S"],
) -> Float[Array, "B T N H"]:
    """Grouped-query attention (MHA when K == N, MQA when K == 1), HF eager numerics."""
    b, t, n, h = q.shape
    kh = k.shape[2]
    qg = q.reshape(b, t, kh, n // kh, h)  # B T K G H  (q head = k*G + g, as HF repeat_kv)
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (h**-0.5)
    scores = jnp.where(mask[:, None, None, :, :], scores, _NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)  # B K G T S
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v)
    return out.reshape(b, t, n, h)


def swiglu(gate: Array, up: Array) -> Array:
    """`silu(gate) * up` (HF `LlamaMLP` with `hidden_act="silu"`)."""
    return jax.nn.silu(gate) * up


def log_softmax_gather(
    logits: Float[Array, "B T V"], targets: Int[Array, "B T"]
) -> Float[Array, "B T"]:
    """Log-probability of `targets` under `logits` (float32)."""
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(lp, targets[..., None], axis=-1)[..., 0]
