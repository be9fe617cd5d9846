"""Flax NNX Llama-family decoder with HF attribute names and a LoRA delta hook.

Modules are thin shells holding parameters (kernels `[in, out]`, HF names: `model.layers[i].
self_attn.q_proj.kernel`); the maths lives in `hilora_jax.model.layers`. Hot paths split the model once
and `jax.jit` a pure function (see `hilora_jax.inference`).

LoRA hook (`hilora_jax.model.hook.LoraHook`): for each activation it projects, the model asks the
hook once for the deltas of the projections reading it (`lora.deltas(layer, ("q_proj", "k_proj",
"v_proj"), x)`) and adds them to the base outputs. Pools and routing decisions are *arguments* of
the hook, not module state, so swapping a pool or changing gates never rebuilds the model and new
gate values never recompile. Shape letters: `hilora_jax.model.projections`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jaxtyping import Array, Bool, Float, Int

from hilora_jax.model import layers
from hilora_jax.model.config import ModelConfig
from hilora_jax.model.hook import LoraHook
from hilora_jax.model.projections import projection


@struct.dataclass
class Positions:
    """Where this call's tokens sit, shared by every layer of one forward pass (`CausalLM.positions`).

    `cos`/`sin [B, T, H]` RoPE tables of the query positions; `q_pos [B, T]` their RoPE positions;
    `q_slot [T]` their cache slots; `key_pos`/`key_valid [B, S]` position and validity of every key
    slot (this call's tokens when there is no cache); `write_at []` the cache slot written first.
    """

    cos: Float[Array, "B T H"]
    sin: Float[Array, "B T H"]
    q_pos: Int[Array, "B T"]
    q_slot: Int[Array, " T"]
    key_pos: Int[Array, "B S"]
    key_valid: Bool[Array, "B S"]
    write_at: Int[Array, ""]


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


# Decode attention order (`DECODE_ATTENTION`, read at trace time). "write_first" (default): write
# this call's keys/values into the cache, then attend over every slot. "then_write": a cached call
# of T tokens into S slots with T * DECODE_FRACTION <= S (decoding) attends over the old cache plus
# its own keys and writes afterwards (`layers.attention_then_write`). On TPU the second order keeps
# XLA from staging the cache on chip and copying it back each step when the step also gathers
# per-row LoRA copies (`gathered`), but with the default `packed` HiLoRA hook and with int8 weights
# the first order reads fewer bytes (docs/aot_decode_bytes.md), and on CPU it is faster
# (benchmarks/decode_attention_cpu.py). Prefill always writes first.
DECODE_FRACTION = 16
DECODE_ATTENTION = "write_first"


@contextlib.contextmanager
def decode_attention(mode: str):
    """Set `DECODE_ATTENTION` while tracing (tests, `benchmarks/aot_decode_bytes.py`)."""
    global DECODE_ATTENTION
    old, DECODE_ATTENTION = DECODE_ATTENTION, mode
    try:
        yield
    finally:
        DECODE_ATTENTION = old


def _attend_then_write(t: int, s: int) -> bool:
    mode = DECODE_ATTENTION
    if mode not in ("then_write", "write_first"):
        raise ValueError(f"llama.DECODE_ATTENTION={DECODE_ATTENTION!r}: choose write_first or "
                         "then_write")
    return mode == "then_write" and t * DECODE_FRACTION <= s


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

    def __call__(self, x: Float[Array, "B T D"], pos: Positions, *,
                 k_cache: Float[Array, "B S K H"] | None = None,
                 v_cache: Float[Array, "B S K H"] | None = None, lora: LoraHook | None = None):
        """`(out [B, T, D], keys, values)`: keys/values are the updated cache (or this call's own
        keys/values without a cache)."""
        b, t, _ = x.shape
        q, k, v = _project(lora, self.layer, x, (("q_proj", self.q_proj), ("k_proj", self.k_proj),
                                                 ("v_proj", self.v_proj)))
        q = q.reshape(b, t, self.num_heads, -1)
        k = k.reshape(b, t, self.num_kv_heads, -1)
        v = v.reshape(b, t, self.num_kv_heads, -1)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = layers.apply_rope(q, pos.cos, pos.sin)  # B T N H
        k = layers.apply_rope(k, pos.cos, pos.sin)  # B T K H
        mask = layers.attention_mask(pos.q_pos, pos.q_slot, pos.key_pos, pos.key_valid,
                                     self.sliding_window)
        then_write = k_cache is not None and _attend_then_write(t, k_cache.shape[1])
        if k_cache is None:  # no cache: keys are this call's tokens
            k_all, v_all = k, v
        elif then_write:  # decode, DECODE_ATTENTION='then_write': attend, then write the cache
            out, k_all, v_all = layers.attention_then_write(q, k_cache, v_cache, k, v, mask,
                                                            pos.write_at)
        else:  # write, then attend (one softmax over every slot)
            at = (0, pos.write_at, 0, 0)
            k_all = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), at)
            v_all = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), at)
        if not then_write:
            out = layers.dot_product_attention(q, k_all.astype(q.dtype), v_all.astype(q.dtype),
                                               mask)
        (out,) = _project(lora, self.layer, out.reshape(b, t, -1), (("o_proj", self.o_proj),))
        return out, k_all, v_all


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, *, dtype, rngs: nnx.Rngs):
        self.layer = layer
        self.gate_proj = _linear(cfg, "gate_proj", bias=cfg.mlp_bias, dtype=dtype, rngs=rngs)
        self.up_proj = _linear(cfg, "up_proj", bias=cfg.mlp_bias, dtype=dtype, rngs=rngs)
        self.down_proj = _linear(cfg, "down_proj", bias=cfg.mlp_bias, dtype=dtype, rngs=rngs)

    def __call__(self, x: Float[Array, "B T D"], *, lora: LoraHook | None = None):
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

    def __call__(self, x: Float[Array, "B T D"], pos: Positions, *,
                 k_cache: Float[Array, "B S K H"] | None = None,
                 v_cache: Float[Array, "B S K H"] | None = None, lora: LoraHook | None = None):
        h, k, v = self.self_attn(self.input_layernorm(x), pos, k_cache=k_cache, v_cache=v_cache,
                                 lora=lora)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x), lora=lora)
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

    # -- pieces: callers compose them (prefix reuse, hidden states, tail scoring) ------------
    def positions(self, attention_mask: Bool[Array, "B T"], *, positions=None,
                  cache: KVCache | None = None, dtype=None) -> Positions:
        """`Positions` of this call's tokens. RoPE positions default to `cumsum(mask) - 1` (left
        padding does not shift them), continued after the cache's last valid position."""
        cfg = self.config
        t = attention_mask.shape[1]
        attention_mask = attention_mask.astype(bool)
        if positions is None:
            positions = jnp.maximum(jnp.cumsum(attention_mask, axis=1) - 1, 0).astype(jnp.int32)
            if cache is not None:
                prev = jnp.max(jnp.where(cache.valid, cache.pos + 1, 0), axis=1)  # B
                positions = positions + prev[:, None]
        inv_freq = jnp.asarray(cfg.rope.inv_freq(cfg.head_dim))  # static, derived from config
        cos, sin = layers.rope_cos_sin(positions, inv_freq, dtype or self.dtype)
        if cache is None:
            return Positions(cos, sin, positions, jnp.arange(t), positions, attention_mask,
                             jnp.zeros((), jnp.int32))
        write_at = cache.index
        return Positions(cos, sin, positions, write_at + jnp.arange(t),
                         jax.lax.dynamic_update_slice(cache.pos, positions, (0, write_at)),
                         jax.lax.dynamic_update_slice(cache.valid, attention_mask, (0, write_at)),
                         write_at)

    def embed(self, input_ids: Int[Array, "B T"], constrain=None) -> Float[Array, "B T D"]:
        """Token embeddings (the hidden state before layer 0)."""
        x = self.model.embed_tokens(input_ids)
        return x if constrain is None else constrain(x, "act")

    def run_layers(self, x: Float[Array, "B T D"], pos: Positions, start: int = 0,
                   stop: int | None = None, *, cache: KVCache | None = None,
                   lora: LoraHook | None = None, constrain=None):
        """Layers `[start, stop)` on hidden state `x` (after layer `start - 1`). Returns
        `(x, keys, values)`, the per-layer keys/values of the layers run (the new cache entries
        when `cache` is given)."""
        stop = self.config.num_layers if stop is None else stop
        ks, vs = [], []
        for i in range(start, stop):
            x, k, v = self.model.layers[i](
                x, pos, k_cache=None if cache is None else cache.k[i],
                v_cache=None if cache is None else cache.v[i], lora=lora)
            if constrain is not None:
                x = constrain(x, "act")
            ks.append(k)
            vs.append(v)
        return x, ks, vs

    def head(self, x: Float[Array, "B T D"], constrain=None) -> Float[Array, "B T V"]:
        """Final norm and LM head (tied embeddings when configured); float32 logits."""
        x = self.model.norm(x)
        logits = self.model.embed_tokens.attend(x) if self.lm_head is None else self.lm_head(x)
        if constrain is not None:
            logits = constrain(logits, "logits")
        return logits.astype(jnp.float32)

    def hidden(self, input_ids: Int[Array, "B T"], attention_mask: Bool[Array, "B T"] | None = None,
               *, layer: int | None = None, lora: LoraHook | None = None,
               constrain=None) -> Float[Array, "B T D"]:
        """Hidden state after `layer` layers (default all, before the final norm; 0 = embeddings);
        only those layers run. No cache."""
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, bool)
        x = self.embed(input_ids, constrain)
        pos = self.positions(attention_mask, dtype=x.dtype)
        return self.run_layers(x, pos, 0, layer, lora=lora, constrain=constrain)[0]

    def __call__(
        self,
        input_ids: Int[Array, "B T"],
        attention_mask: Bool[Array, "B T"] | None = None,
        *,
        positions: Int[Array, "B T"] | None = None,
        cache: KVCache | None = None,
        lora: LoraHook | None = None,
        logits_at: str = "all",
        constrain=None,
    ):
        """Run the decoder: `embed`, `run_layers` over every layer, `head`.

        Returns `(logits, cache)`: logits `[B, T, V]` float32 (or `[B, 1, V]` with
        `logits_at="last"`, None with `"none"`) and the updated cache (None without one). Positions default to
        `cumsum(attention_mask) - 1` so left padding does not shift RoPE. `constrain(x, kind)`
        (optional) applies sharding constraints at block boundaries. For hidden states or resuming
        from them, compose the pieces (`hidden`, `positions` + `run_layers`, `head`).
        """
        b, t = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), bool)
        x = self.embed(input_ids, constrain)  # B T D
        pos = self.positions(attention_mask, positions=positions, cache=cache, dtype=x.dtype)
        x, ks, vs = self.run_layers(x, pos, cache=cache, lora=lora, constrain=constrain)
        new_cache = None
        if cache is not None:
            new_cache = KVCache(k=ks, v=vs, pos=pos.key_pos, valid=pos.key_valid,
                                index=pos.write_at + t)
        if logits_at == "none":
            return None, new_cache
        if logits_at == "last":
            x = x[:, -1:, :]
        return self.head(x, constrain), new_cache
