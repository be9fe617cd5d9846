"""Flax NNX Llama-family decoder with HF attribute names and a LoRA delta hook.

Modules are thin shells holding parameters (kernels `[in, out]`, HF names: `model.layers[i].
self_attn.q_proj.kernel`); the maths lives in `hilora_jax.nn.layers`. Hot paths split the model once
and `jax.jit` a pure function (see `hilora_jax.inference`).

LoRA hook (`hilora_jax.lora.hook.LoraHook`): for each activation it projects, the model asks the
hook once for the deltas of the projections reading it (`lora.deltas(layer, ("q_proj", "k_proj",
"v_proj"), x)`) and adds them to the base outputs. Pools and routing decisions are *arguments* of
the hook, not module state, so swapping a pool or changing gates never rebuilds the model and new
gate values never recompile. Shape letters: `hilora_jax.projections`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jaxtyping import Array, Bool, Float, Int

from hilora_jax.config import ModelConfig
from hilora_jax.lora.hook import LoraHook
from hilora_jax.nn import layers
from hilora_jax.projections import projection


@struct.dataclass
class KVCache:
    """Per-layer key/value cache. Left-padded batches keep all rows on the same write slot."""

    k: list  # L x [B, S, K, H]
    v: list  # L x [B, S, K, H]
    pos: Int[Array, "B S"]  # RoPE position of each slot
    valid: Bool[Array, "B S"]  # slot holds a real (non-padding) token
    index: Int[Array, ""]  # next slot to write

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, size: int, dtype) -> KVCache:
        shape = (batch, size, cfg.num_kv_heads, cfg.head_dim)
        return cls(
            k=[jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)],
            v=[jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)],
            pos=jnp.zeros((batch, size), jnp.int32),
            valid=jnp.zeros((batch, size), bool),
            index=jnp.zeros((), jnp.int32),
        )


def _init(rngs: nnx.Rngs, shape, dtype, std=0.02):
    return jax.random.normal(rngs.params(), shape, dtype) * std


class Linear(nnx.Module):
    def __init__(self, d_in: int, d_out: int, *, bias: bool, dtype, rngs: nnx.Rngs):
        self.kernel = nnx.Param(_init(rngs, (d_in, d_out), dtype))  # [in, out]
        self.bias = nnx.Param(jnp.zeros((d_out,), dtype)) if bias else None

    def __call__(self, x: Array) -> Array:
        y = jnp.einsum("...D,DF->...F", x, self.kernel[...])
        if self.bias is not None:
            y = y + self.bias[...]
        return y


def _linear(cfg: ModelConfig, name: str, *, bias: bool, dtype, rngs: nnx.Rngs) -> Linear:
    """The adaptable projection `name`, shaped from the projection table."""
    return Linear(*projection(name).shape(cfg), bias=bias, dtype=dtype, rngs=rngs)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x: Array) -> Array:
        return layers.rms_norm(x, self.weight[...], self.eps)


def _project(lora: LoraHook | None, layer: int, x: Array,
             mods: Sequence[tuple[str, Linear]]) -> tuple[Array, ...]:
    """`x W + delta` for each `(name, Linear)` reading `x`; one hook call for all of them."""
    ys = [mod(x) for _, mod in mods]
    if lora is None:
        return tuple(ys)
    outs = lora.deltas(layer, tuple(n for n, _ in mods), x)
    return tuple(y if out is None else y + out[0].astype(y.dtype)
                 for y, out in zip(ys, outs, strict=True))


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, *, dtype, rngs: nnx.Rngs):
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.sliding_window = cfg.sliding_window
        self.q_proj = _linear(cfg, "q_proj", bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
        self.k_proj = _linear(cfg, "k_proj", bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
        self.v_proj = _linear(cfg, "v_proj", bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
        self.o_proj = _linear(cfg, "o_proj", bias=cfg.o_bias, dtype=dtype, rngs=rngs)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype=dtype)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype=dtype)
        else:
            self.q_norm = self.k_norm = None

    def __call__(self, x, cos, sin, q_pos, q_slot, k_cache, v_cache, cache_pos, cache_valid,
                 write_at, lora):
        b, t, _ = x.shape
        q, k, v = _project(lora, self.layer, x, (("q_proj", self.q_proj), ("k_proj", self.k_proj),
                                                 ("v_proj", self.v_proj)))
        q = q.reshape(b, t, self.num_heads, -1)
        k = k.reshape(b, t, self.num_kv_heads, -1)
        v = v.reshape(b, t, self.num_kv_heads, -1)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = layers.apply_rope(q, cos, sin)  # B T N H
        k = layers.apply_rope(k, cos, sin)  # B T K H
        if k_cache is None:  # no cache: keys are this call's tokens
            k_all, v_all = k, v
        else:
            k_all = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, write_at, 0, 0))
            v_all = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, write_at, 0, 0))
        mask = layers.attention_mask(q_pos, q_slot, cache_pos, cache_valid, self.sliding_window)
        out = layers.dot_product_attention(q, k_all.astype(q.dtype), v_all.astype(q.dtype), mask)
        (out,) = _project(lora, self.layer, out.reshape(b, t, -1), (("o_proj", self.o_proj),))
        return out, k_all, v_all


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, *, dtype, rngs: nnx.Rngs):
        self.layer = layer
        self.gate_proj = _linear(cfg, "gate_proj", bias=cfg.mlp_bias, dtype=dtype, rngs=rngs)
        self.up_proj = _linear(cfg, "up_proj", bias=cfg.mlp_bias, dtype=dtype, rngs=rngs)
        self.down_proj = _linear(cfg, "down_proj", bias=cfg.mlp_bias, dtype=dtype, rngs=rngs)

    def __call__(self, x, lora):
        g, u = _project(lora, self.layer, x, (("gate_proj", self.gate_proj),
                                              ("up_proj", self.up_proj)))  # B T F
        (y,) = _project(lora, self.layer, layers.swiglu(g, u), (("down_proj", self.down_proj),))
        return y


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, *, dtype, rngs: nnx.Rngs):
        self.self_attn = Attention(cfg, layer, dtype=dtype, rngs=rngs)
        self.mlp = MLP(cfg, layer, dtype=dtype, rngs=rngs)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)

    def __call__(self, x, cos, sin, q_pos, q_slot, k_cache, v_cache, cache_pos, cache_valid,
                 write_at, lora):
        h, k, v = self.self_attn(self.input_layernorm(x), cos, sin, q_pos, q_slot, k_cache,
                                 v_cache, cache_pos, cache_valid, write_at, lora)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x), lora)
        return x, k, v


class Embed(nnx.Module):
    def __init__(self, vocab: int, dim: int, *, dtype, rngs: nnx.Rngs):
        self.embedding = nnx.Param(_init(rngs, (vocab, dim), dtype))  # [V, D]

    def __call__(self, ids: Array) -> Array:
        return jnp.take(self.embedding[...], ids, axis=0)

    def attend(self, x: Array) -> Array:
        return jnp.einsum("BTD,VD->BTV", x, self.embedding[...])


class DecoderModel(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, rngs=rngs)
        self.layers = nnx.List(
            [DecoderLayer(cfg, i, dtype=dtype, rngs=rngs) for i in range(cfg.num_layers)]
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)


class CausalLM(nnx.Module):
    """A Llama-family causal LM. `model.config` is the `ModelConfig`."""

    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.config = cfg
        self.dtype = jnp.dtype(dtype)
        self.model = DecoderModel(cfg, dtype=dtype, rngs=rngs)
        self.lm_head = (
            None if cfg.tie_word_embeddings
            else Linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype, rngs=rngs)
        )

    def __call__(
        self,
        input_ids: Int[Array, "B T"],
        attention_mask: Bool[Array, "B T"] | None = None,
        *,
        positions: Int[Array, "B T"] | None = None,
        cache: KVCache | None = None,
        lora: LoraHook | None = None,
        logits_at: str = "all",
        hidden_layer: int | None = None,
        constrain=None,
        start_layer: int = 0,
        hidden_in: Float[Array, "B T D"] | None = None,
    ):
        """Run the decoder.

        Returns `(logits, cache, hidden)`: logits `[B, T, V]` (or `[B, 1, V]` with
        `logits_at="last"`, or None with `"none"`), the updated cache (None without one), and the
        hidden state after layer `hidden_layer` (0 = embeddings) when asked for.
        Positions default to `cumsum(attention_mask) - 1` so left padding does not shift RoPE.
        `constrain(x, kind)` (optional) applies sharding constraints at block boundaries.

        Prefix reuse: with `logits_at="none"` and `hidden_layer=k` the layers above k are skipped;
        `start_layer=k, hidden_in=h` resumes from that hidden state (e.g. when every adapted module
        lies at or above layer k, the prefix below it is shared by all routers). Not with a cache.
        """
        cfg = self.config
        b, t = input_ids.shape
        if (start_layer > 0) != (hidden_in is not None):
            raise ValueError("start_layer > 0 and hidden_in go together")
        if start_layer > 0 and cache is not None:
            raise ValueError("resuming from a hidden state is not supported with a KV cache")
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), bool)
        attention_mask = attention_mask.astype(bool)
        if positions is None:
            positions = jnp.maximum(jnp.cumsum(attention_mask, axis=1) - 1, 0).astype(jnp.int32)
            if cache is not None:
                prev = jnp.max(jnp.where(cache.valid, cache.pos + 1, 0), axis=1)  # B
                positions = positions + prev[:, None]
        x = self.model.embed_tokens(input_ids) if hidden_in is None else hidden_in  # B T D
        if constrain is not None:
            x = constrain(x, "act")
        inv_freq = jnp.asarray(cfg.rope.inv_freq(cfg.head_dim))  # static, derived from config
        cos, sin = layers.rope_cos_sin(positions, inv_freq, x.dtype)
        if cache is None:
            write_at = jnp.zeros((), jnp.int32)
            q_slot = jnp.arange(t)
            cache_pos, cache_valid = positions, attention_mask
        else:
            write_at = cache.index
            q_slot = write_at + jnp.arange(t)
            cache_pos = jax.lax.dynamic_update_slice(cache.pos, positions, (0, write_at))
            cache_valid = jax.lax.dynamic_update_slice(cache.valid, attention_mask, (0, write_at))
        hidden = x if hidden_layer == start_layer else None
        stop = hidden_layer if (logits_at == "none" and hidden_layer is not None) else cfg.num_layers
        new_k, new_v = [], []
        for i, layer in enumerate(self.model.layers):
            if i < start_layer or i >= stop:
                continue
            kc = None if cache is None else cache.k[i]
            vc = None if cache is None else cache.v[i]
            x, k, v = layer(x, cos, sin, positions, q_slot, kc, vc, cache_pos, cache_valid,
                            write_at, lora)
            if constrain is not None:
                x = constrain(x, "act")
            new_k.append(k)
            new_v.append(v)
            if hidden_layer == i + 1:
                hidden = x
        new_cache = None
        if cache is not None:
            new_cache = KVCache(k=new_k, v=new_v, pos=cache_pos, valid=cache_valid,
                                index=write_at + t)
        if logits_at == "none":
            return None, new_cache, hidden
        x = self.model.norm(x)
        if logits_at == "last":
            x = x[:, -1:, :]
        if self.lm_head is None:
            logits = self.model.embed_tokens.attend(x)
        else:
            logits = self.lm_head(x)
        if constrain is not None:
            logits = constrain(logits, "logits")
        return logits.astype(jnp.float32), new_cache, hidden
