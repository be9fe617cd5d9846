"""Flax NNX T5 / FLAN-T5 encoder-decoder with HF attribute names and a LoRA delta hook.

Module and parameter paths follow transformers' `T5ForConditionalGeneration`, so the weight
mapping (`hilora_jax.t5.load`) is one table: HF `encoder.block.3.layer.1.DenseReluDense.wi_0.weight`
is our `encoder.block.3.layer.1.DenseReluDense.wi_0.kernel` (transposed to `[in, out]`). Blocks:
encoder `layer[0]` self-attention + `layer[1]` feed-forward; decoder `layer[0]` causal
self-attention + `layer[1]` cross-attention (`EncDecAttention`) + `layer[2]` feed-forward.

Numerics follow transformers (fp32 parity <= 1e-4):

* T5 layer norm: RMS only (no mean, no bias), variance in float32, cast back to the weight dtype;
* attention logits are *not* scaled (T5 folds 1/sqrt(d_kv) into the q initialisation); the
  relative position bias is computed by the first block of each stack from its
  `relative_attention_bias` embedding and shared by every later block; bidirectional buckets in
  the encoder, causal ones in the decoder, none in cross-attention;
* bucket indices come from a host (NumPy float32) table over relative distances, which equals
  torch's float32 bucket arithmetic exactly (XLA's `log` can differ by one ulp at the bucket
  boundaries that fall on integers, e.g. distance 16/32/64 with 32 buckets);
* head: tied (`shared`, decoder output scaled by `d_model ** -0.5` when `scale_decoder_outputs`)
  or an untied `lm_head`;
* bf16: `wo` of every feed-forward is kept and computed in float32 (transformers' T5 declares
  `_keep_in_fp32_modules = ["wo"]` because activations overflow in half precision there; 5.24
  loading with `dtype=torch.bfloat16` nevertheless leaves it in bf16). Only fp32 is held to
  transformers' numbers; bf16 is tested to be as close to fp32 as transformers' own bf16 is.

LoRA hook: the Llama model's protocol (`hilora_jax.model.hook.LoraHook`). Projections reading the
same activation ask together, `lora.deltas(block, rows, x)` (self-attention q/k/v, cross-attention
k/v, gated wi_0/wi_1; `project`), the others alone, `lora.delta(block, row, x)`, with the block
index and the projection rows
(`hilora_jax.model.projections.T5`: `encoder.SelfAttention.q`, `decoder.EncDecAttention.k`,
`decoder.DenseReluDense.wo`, ...; a pool's keys) and adds the returned delta `[B, T, d_out]`
(None: not adapted), so every pool hook and router hook works on T5 unchanged. Cross-attention
k/v are asked once per generation, on the encoder output (`init_cache`). The hook is an argument,
never module state.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jaxtyping import Array, Bool, Float, Int

from hilora_jax.model.hook import LoraHook
from hilora_jax.t5.config import T5Config

_NEG = -1e30  # finite "minus infinity": fully masked rows (padding queries) never give NaN


# -- pure maths ------------------------------------------------------------------------------
def relative_position_bucket(rel: np.ndarray, *, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> np.ndarray:
    """transformers' `T5Attention._relative_position_bucket` in NumPy float32 (bit-identical)."""
    rel = np.asarray(rel, np.int64)
    ret = np.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        ret += (rel > 0).astype(np.int64) * num_buckets
        n = np.abs(rel)
    else:
        n = -np.minimum(rel, 0)
    max_exact = num_buckets // 2
    with np.errstate(divide="ignore", invalid="ignore"):
        large = max_exact + (np.log(n.astype(np.float32) / np.float32(max_exact))
                             / np.float32(math.log(max_distance / max_exact))
                             * np.float32(num_buckets - max_exact)).astype(np.int64)
    large = np.minimum(large, num_buckets - 1)
    return ret + np.where(n < max_exact, n, large)


@lru_cache(maxsize=64)
def bucket_table(span: int, bidirectional: bool, num_buckets: int, max_distance: int) -> np.ndarray:
    """Bucket of every relative distance `-(span-1) .. span-1` (index `rel + span - 1`), int32."""
    rel = np.arange(-(span - 1), span)
    return relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=num_buckets,
                                    max_distance=max_distance).astype(np.int32)


def t5_layer_norm(x: Array, weight: Array, eps: float) -> Array:
    """HF `T5LayerNorm`: x * rsqrt(mean(x^2) + eps) in float32, cast to the weight dtype, scaled."""
    var = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
    y = x.astype(jnp.float32) * jax.lax.rsqrt(var + eps)
    return weight * y.astype(weight.dtype)


def activation(name: str) -> Callable[[Array], Array]:
    if name == "relu":
        return jax.nn.relu
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return lambda x: jax.nn.gelu(x, approximate=True)
    if name in ("silu", "swish"):
        return jax.nn.silu
    raise ValueError(f"activation {name!r} is not implemented")


def attention(q: Float[Array, "B T N H"], k: Float[Array, "B S N H"], v: Float[Array, "B S N H"],
              bias: Float[Array, "1 N T S"] | None, mask: Bool[Array, "B T S"]) -> Array:
    """Unscaled dot-product attention with an additive position bias, softmax in float32."""
    scores = jnp.einsum("BTNH,BSNH->BNTS", q, k, preferred_element_type=jnp.float32)
    if bias is not None:
        scores = scores + bias.astype(jnp.float32)
    scores = jnp.where(mask[:, None], scores, _NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("BNTS,BSNH->BTNH", probs, v)


# -- modules ---------------------------------------------------------------------------------
def _init(rngs: nnx.Rngs, shape, dtype, std=0.05):
    return jax.random.normal(rngs.params(), shape, dtype) * std


_MODULE_KEY = re.compile(r"^(encoder|decoder)\.block\.(\d+)\.layer\.\d+\.(\w+)\.(\w+)$")


def split_module_key(path: str) -> tuple[int, str] | None:
    """HF module path -> the hook's `(layer, name)`: block index and projection row
    (`decoder.block.2.layer.1.EncDecAttention.q` -> `(2, "decoder.EncDecAttention.q")`, the row
    names of `hilora_jax.model.projections.T5`); None for a module outside the blocks."""
    m = _MODULE_KEY.match(path)
    if m is None:
        return None
    return int(m.group(2)), f"{m.group(1)}.{m.group(3)}.{m.group(4)}"


class Linear(nnx.Module):
    """Bias-free projection, kernel `[in, out]`; `path` is its HF module path, `(index, row)` its
    hook key (`split_module_key`)."""

    def __init__(self, d_in: int, d_out: int, path: str, *, dtype, rngs: nnx.Rngs):
        self.kernel = nnx.Param(_init(rngs, (d_in, d_out), dtype))
        self.path = path
        key = split_module_key(path)
        self.index, self.row = key if key is not None else (None, None)

    def __call__(self, x: Array, lora: LoraHook | None = None) -> Array:
        w = self.kernel[...]
        y = jnp.einsum("...D,DF->...F", x.astype(w.dtype), w)
        if lora is not None and self.row is not None:
            out = lora.delta(self.index, self.row, x)
            if out is not None:
                y = y + out[0].astype(y.dtype)
        return y


def project(lora: LoraHook | None, mods, x: Array) -> list[Array]:
    """`x W + delta` for Linears of one block reading the same `x` (q/k/v; k/v of
    cross-attention; wi_0/wi_1): one `lora.deltas(block, rows, x)` call for all of them, as the
    Llama model asks (packed HiLoRA then computes their responses in one matmul)."""
    ys = [m(x) for m in mods]
    if lora is None:
        return ys
    outs = lora.deltas(mods[0].index, tuple(m.row for m in mods), x)
    return [y if o is None else y + o[0].astype(y.dtype) for y, o in zip(ys, outs, strict=True)]


class Embed(nnx.Module):
    def __init__(self, num: int, dim: int, *, dtype, rngs: nnx.Rngs, std: float = 0.5):
        self.embedding = nnx.Param(_init(rngs, (num, dim), dtype, std))  # [num, dim]

    def __call__(self, ids: Array) -> Array:
        return jnp.take(self.embedding[...], ids, axis=0)


class T5LayerNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x: Array) -> Array:
        return t5_layer_norm(x, self.weight[...], self.eps)


class T5Attention(nnx.Module):
    def __init__(self, cfg: T5Config, path: str, *, has_relative_attention_bias: bool, dtype,
                 rngs: nnx.Rngs):
        d, inner = cfg.d_model, cfg.inner_dim
        self.num_heads, self.d_kv = cfg.num_heads, cfg.d_kv
        self.q = Linear(d, inner, f"{path}.q", dtype=dtype, rngs=rngs)
        self.k = Linear(d, inner, f"{path}.k", dtype=dtype, rngs=rngs)
        self.v = Linear(d, inner, f"{path}.v", dtype=dtype, rngs=rngs)
        self.o = Linear(inner, d, f"{path}.o", dtype=dtype, rngs=rngs)
        self.relative_attention_bias = (
            Embed(cfg.relative_attention_num_buckets, cfg.num_heads, dtype=dtype, rngs=rngs)
            if has_relative_attention_bias else None)

    def split_heads(self, y: Array) -> Array:
        b, t, _ = y.shape
        return y.reshape(b, t, self.num_heads, self.d_kv)

    def qkv(self, x: Array, lora) -> tuple[Array, Array, Array]:
        """Self-attention q, k, v heads `[B, T, N, H]` of `x` (one hook call)."""
        return tuple(self.split_heads(y) for y in project(lora, (self.q, self.k, self.v), x))

    def kv(self, x: Array, lora) -> tuple[Array, Array]:
        """k, v heads of `x` (cross-attention: the encoder output; one hook call)."""
        return tuple(self.split_heads(y) for y in project(lora, (self.k, self.v), x))

    def heads(self, proj: Linear, x: Array, lora) -> Array:
        b, t, _ = x.shape
        return proj(x, lora).reshape(b, t, self.num_heads, self.d_kv)

    def __call__(self, x, k, v, bias, mask, lora, q=None):
        """`x [B, T, D]` queries (or their heads `q`, already projected) against keys/values
        `[B, S, N, H]`; returns `[B, T, D]`."""
        b, t, _ = x.shape
        q = self.heads(self.q, x, lora) if q is None else q
        out = attention(q, k.astype(q.dtype), v.astype(q.dtype), bias, mask)
        return self.o(out.reshape(b, t, -1), lora)


class T5LayerSelfAttention(nnx.Module):
    def __init__(self, cfg, path, *, has_relative_attention_bias, dtype, rngs):
        self.SelfAttention = T5Attention(cfg, f"{path}.SelfAttention", dtype=dtype, rngs=rngs,
                                         has_relative_attention_bias=has_relative_attention_bias)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon, dtype=dtype)


class T5LayerCrossAttention(nnx.Module):
    def __init__(self, cfg, path, *, dtype, rngs):
        self.EncDecAttention = T5Attention(cfg, f"{path}.EncDecAttention", dtype=dtype, rngs=rngs,
                                           has_relative_attention_bias=False)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon, dtype=dtype)


class T5DenseActDense(nnx.Module):
    """v1.0 feed-forward: wo(act(wi(x)))."""

    def __init__(self, cfg: T5Config, path: str, *, dtype, rngs):
        wo_dtype = jnp.float32 if jnp.dtype(dtype).itemsize < 4 else dtype
        self.wi = Linear(cfg.d_model, cfg.d_ff, f"{path}.wi", dtype=dtype, rngs=rngs)
        self.wo = Linear(cfg.d_ff, cfg.d_model, f"{path}.wo", dtype=wo_dtype, rngs=rngs)
        self.act_name = cfg.dense_act_fn

    def __call__(self, x, lora):
        h = activation(self.act_name)(self.wi(x, lora))
        return self.wo(h, lora).astype(x.dtype)


class T5DenseGatedActDense(nnx.Module):
    """v1.1 / FLAN-T5 feed-forward: wo(act(wi_0(x)) * wi_1(x))."""

    def __init__(self, cfg: T5Config, path: str, *, dtype, rngs):
        wo_dtype = jnp.float32 if jnp.dtype(dtype).itemsize < 4 else dtype
        self.wi_0 = Linear(cfg.d_model, cfg.d_ff, f"{path}.wi_0", dtype=dtype, rngs=rngs)
        self.wi_1 = Linear(cfg.d_model, cfg.d_ff, f"{path}.wi_1", dtype=dtype, rngs=rngs)
        self.wo = Linear(cfg.d_ff, cfg.d_model, f"{path}.wo", dtype=wo_dtype, rngs=rngs)
        self.act_name = cfg.dense_act_fn

    def __call__(self, x, lora):
        g, u = project(lora, (self.wi_0, self.wi_1), x)
        h = activation(self.act_name)(g) * u
        return self.wo(h, lora).astype(x.dtype)


class T5LayerFF(nnx.Module):
    def __init__(self, cfg: T5Config, path: str, *, dtype, rngs):
        cls = T5DenseGatedActDense if cfg.is_gated_act else T5DenseActDense
        self.DenseReluDense = cls(cfg, f"{path}.DenseReluDense", dtype=dtype, rngs=rngs)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon, dtype=dtype)

    def __call__(self, x, lora):
        return x + self.DenseReluDense(self.layer_norm(x), lora)


class T5Block(nnx.Module):
    def __init__(self, cfg: T5Config, path: str, *, decoder: bool, first: bool, dtype, rngs):
        layers = [T5LayerSelfAttention(cfg, f"{path}.layer.0", has_relative_attention_bias=first,
                                       dtype=dtype, rngs=rngs)]
        if decoder:
            layers.append(T5LayerCrossAttention(cfg, f"{path}.layer.1", dtype=dtype, rngs=rngs))
        layers.append(T5LayerFF(cfg, f"{path}.layer.{len(layers)}", dtype=dtype, rngs=rngs))
        self.layer = nnx.List(layers)


class T5Stack(nnx.Module):
    def __init__(self, cfg: T5Config, name: str, *, decoder: bool, dtype, rngs):
        n = cfg.num_decoder_layers if decoder else cfg.num_layers
        self.block = nnx.List([T5Block(cfg, f"{name}.block.{i}", decoder=decoder, first=i == 0,
                                       dtype=dtype, rngs=rngs) for i in range(n)])
        self.final_layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon, dtype=dtype)
        self.is_decoder = decoder
        self.cfg = cfg

    def position_bias(self, q_pos: Int[Array, " T"], span: int) -> Array:
        """`[1, N, T, span]` bias of queries at `q_pos` against key slots `0..span-1`."""
        cfg = self.cfg
        table = jnp.asarray(bucket_table(span, not self.is_decoder,
                                         cfg.relative_attention_num_buckets,
                                         cfg.relative_attention_max_distance))
        rel = jnp.arange(span)[None, :] - q_pos[:, None]  # T S
        buckets = table[rel + span - 1]
        emb = self.block[0].layer[0].SelfAttention.relative_attention_bias.embedding[...]
        return jnp.transpose(jnp.take(emb, buckets, axis=0), (2, 0, 1))[None]  # 1 N T S


@struct.dataclass
class DecoderCache:
    """Decoder self-attention K/V (`[B, S, N, H]` per layer, slot = position) plus the
    cross-attention K/V of the encoder output (`[B, Te, N, H]` per layer), computed once."""

    k: list
    v: list
    valid: Bool[Array, "B S"]  # slot holds a real decoder token
    index: Int[Array, ""]  # next slot to write (= next decoder position)
    cross_k: list
    cross_v: list
    enc_mask: Bool[Array, "B Te"]


class T5ForConditionalGeneration(nnx.Module):
    """T5 v1.0 / v1.1 / FLAN-T5. `model.config` is the `T5Config`."""

    def __init__(self, cfg: T5Config, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.config = cfg
        self.dtype = jnp.dtype(dtype)
        self.shared = Embed(cfg.vocab_size, cfg.d_model, dtype=dtype, rngs=rngs)
        self.encoder = T5Stack(cfg, "encoder", decoder=False, dtype=dtype, rngs=rngs)
        self.decoder = T5Stack(cfg, "decoder", decoder=True, dtype=dtype, rngs=rngs)
        self.lm_head = (None if cfg.tie_word_embeddings
                        else Linear(cfg.d_model, cfg.vocab_size, "lm_head", dtype=dtype, rngs=rngs))

    # -- encoder -------------------------------------------------------------------------
    def encode(self, input_ids: Int[Array, "B T"], attention_mask: Bool[Array, "B T"] | None = None,
               *, lora: LoraHook | None = None, constrain=None) -> Float[Array, "B T D"]:
        """Encoder output (after `final_layer_norm`). Padding may be on either side: keys are
        masked, positions are indices (as in transformers)."""
        b, t = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), bool)
        mask = jnp.broadcast_to(attention_mask.astype(bool)[:, None, :], (b, t, t))
        x = self.shared(input_ids)
        bias = self.encoder.position_bias(jnp.arange(t), t)
        for blk in self.encoder.block:
            sa = blk.layer[0]
            h = sa.layer_norm(x)
            att = sa.SelfAttention
            q, k, v = att.qkv(h, lora)
            x = x + att(h, k, v, bias, mask, lora, q=q)
            x = blk.layer[1](x, lora)
            if constrain is not None:
                x = constrain(x, "act")
        return self.encoder.final_layer_norm(x)

    # -- decoder -------------------------------------------------------------------------
    def init_cache(self, enc_out: Float[Array, "B Te D"], enc_mask: Bool[Array, "B Te"],
                   size: int, *, lora: LoraHook | None = None) -> DecoderCache:
        """Empty self-attention cache of `size` slots and the cross-attention K/V of `enc_out`."""
        cfg = self.config
        b = enc_out.shape[0]
        shape = (b, size, cfg.num_heads, cfg.d_kv)
        ck, cv = [], []
        for blk in self.decoder.block:
            att = blk.layer[1].EncDecAttention
            k, v = att.kv(enc_out, lora)
            ck.append(k)
            cv.append(v)
        n = cfg.num_decoder_layers
        return DecoderCache(k=[jnp.zeros(shape, self.dtype) for _ in range(n)],
                            v=[jnp.zeros(shape, self.dtype) for _ in range(n)],
                            valid=jnp.zeros((b, size), bool), index=jnp.zeros((), jnp.int32),
                            cross_k=ck, cross_v=cv, enc_mask=enc_mask.astype(bool))

    def decode(self, decoder_input_ids: Int[Array, "B T"], cache: DecoderCache,
               decoder_attention_mask: Bool[Array, "B T"] | None = None, *,
               lora: LoraHook | None = None, constrain=None, logits_at: str = "all"):
        """Append `T` decoder tokens at slot `cache.index`; returns `(logits [B, T|1, V] float32,
        new cache)`. `decoder_attention_mask` marks real tokens (padding is masked as a key)."""
        b, t = decoder_input_ids.shape
        if decoder_attention_mask is None:
            decoder_attention_mask = jnp.ones((b, t), bool)
        s = cache.k[0].shape[1]
        at = cache.index
        q_pos = at + jnp.arange(t)
        valid = jax.lax.dynamic_update_slice(cache.valid, decoder_attention_mask.astype(bool),
                                             (0, at))
        self_mask = (jnp.arange(s)[None, None, :] <= q_pos[None, :, None]) & valid[:, None, :]
        cross_mask = jnp.broadcast_to(cache.enc_mask[:, None, :], (b, t, cache.enc_mask.shape[1]))
        bias = self.decoder.position_bias(q_pos, s)
        x = self.shared(decoder_input_ids)
        new_k, new_v = [], []
        for i, blk in enumerate(self.decoder.block):
            sa = blk.layer[0]
            h = sa.layer_norm(x)
            att = sa.SelfAttention
            q, k_new, v_new = att.qkv(h, lora)
            k = jax.lax.dynamic_update_slice(cache.k[i], k_new.astype(cache.k[i].dtype),
                                             (0, at, 0, 0))
            v = jax.lax.dynamic_update_slice(cache.v[i], v_new.astype(cache.v[i].dtype),
                                             (0, at, 0, 0))
            new_k.append(k)
            new_v.append(v)
            x = x + att(h, k, v, bias, self_mask, lora, q=q)
            ca = blk.layer[1]
            x = x + ca.EncDecAttention(ca.layer_norm(x), cache.cross_k[i], cache.cross_v[i], None,
                                       cross_mask, lora)
            x = blk.layer[2](x, lora)
            if constrain is not None:
                x = constrain(x, "act")
        new_cache = cache.replace(k=new_k, v=new_v, valid=valid, index=at + t)
        x = self.decoder.final_layer_norm(x)
        if logits_at == "last":
            x = x[:, -1:]
        return self.logits(x, constrain), new_cache

    def logits(self, x: Float[Array, "B T D"], constrain=None) -> Float[Array, "B T V"]:
        cfg = self.config
        if cfg.scale_decoder_outputs:
            x = x * (cfg.d_model ** -0.5)
        if self.lm_head is None:
            out = jnp.einsum("BTD,VD->BTV", x, self.shared.embedding[...])
        else:
            out = self.lm_head(x)
        if constrain is not None:
            out = constrain(out, "logits")
        return out.astype(jnp.float32)

    def __call__(self, input_ids, attention_mask=None, decoder_input_ids=None,
                 decoder_attention_mask=None, *, lora: LoraHook | None = None, constrain=None):
        """Teacher-forced logits `[B, Td, V]` (float32), as HF's forward with decoder ids."""
        enc_mask = (jnp.ones(input_ids.shape, bool) if attention_mask is None
                    else attention_mask.astype(bool))
        enc = self.encode(input_ids, enc_mask, lora=lora, constrain=constrain)
        cache = self.init_cache(enc, enc_mask, decoder_input_ids.shape[1], lora=lora)
        logits, _ = self.decode(decoder_input_ids, cache, decoder_attention_mask, lora=lora,
                                constrain=constrain)
        return logits
