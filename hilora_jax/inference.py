"""Jitted inference entry points: forward, score (log-probs of continuations) and generate.

The model is split once (`nnx.split`) into a static graph definition and a state pytree; each
entry point is a pure function of `(state, inputs, lora)` compiled once per shape bucket with
`jax.jit`. The LoRA hook (`lora`) is a pytree argument: new pools of the same shape, new gates or new
routing decisions never recompile.

Generation left-pads prompts into fixed length buckets (so new prompt lengths reuse compiled
code), prefills a KV cache, and decodes inside one `jax.lax.while_loop` (greedy, or temperature /
top-p sampling with an explicit PRNG key), stopping early when every row hit a stop token.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from hilora_jax import sharding as shd
from hilora_jax.nn.layers import log_softmax_gather
from hilora_jax.nn.model import CausalLM, KVCache


def bucket_length(n: int, minimum: int = 16, multiple: int = 64) -> int:
    """Round a length up: powers of two up to `multiple`, then multiples of `multiple`."""
    b = minimum
    while b < n and b < multiple:
        b *= 2
    if b >= n:
        return b
    return -(-n // multiple) * multiple


def pad_batch(seqs: Sequence[Sequence[int]], length: int, pad_id: int, *, side: str = "left"):
    """Pad token lists into `[B, length]` ids and a boolean mask."""
    b = len(seqs)
    ids = np.full((b, length), pad_id, np.int32)
    mask = np.zeros((b, length), bool)
    for i, s in enumerate(seqs):
        if len(s) > length:
            raise ValueError(f"sequence {i} has {len(s)} tokens, more than the bucket {length}")
        if side == "left":
            ids[i, length - len(s):] = s
            mask[i, length - len(s):] = True
        else:
            ids[i, : len(s)] = s
            mask[i, : len(s)] = True
    return ids, mask


@dataclasses.dataclass
class GenerationOutput:
    tokens: np.ndarray  # [B, max_new_tokens] generated ids, `pad_id` after a stop token
    lengths: np.ndarray  # [B] number of generated tokens (including the stop token)


def _sample(logits, key, temperature, top_p, greedy: bool):
    """logits [B, V] -> token ids [B]."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / jnp.maximum(temperature, 1e-6)
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]  # B V, descending
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    cum = jnp.cumsum(probs, axis=-1)
    keep = (cum - probs) < top_p  # always keeps the top token
    cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits >= cutoff, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


class _Recorder:
    """Wraps a hook during tracing and collects its per-module aux outputs (returned by jit)."""

    def __init__(self, hook):
        self.hook = hook
        self.aux: dict = {}

    def __call__(self, layer, name, x):
        if not hasattr(self.hook, "with_aux"):
            return self.hook(layer, name, x)
        out = self.hook.with_aux(layer, name, x)
        if out is None:
            return None
        delta, aux = out
        self.aux[f"{layer}.{name}"] = aux
        return delta


class Engine:
    """Split-once, jit-compiled inference over a `CausalLM` (optionally sharded over `mesh`)."""

    def __init__(self, model: CausalLM, mesh: Mesh | None = None):
        self.config = model.config
        self.mesh = mesh
        self.graphdef, self.state = nnx.split(model)
        self._constrain = shd.make_constrain(mesh)
        self._forward = jax.jit(self._forward_impl,
                                static_argnames=("logits_at", "hidden_layer", "trace"))
        self._score = jax.jit(self._score_impl)
        self._generate = jax.jit(
            self._generate_impl, static_argnames=("cache_size", "max_new", "greedy")
        )

    # -- pure functions ------------------------------------------------------------------
    def _model(self, state) -> CausalLM:
        return nnx.merge(self.graphdef, state)

    def _forward_impl(self, state, ids, mask, lora, logits_at="all", hidden_layer=None,
                      trace=False):
        rec = _Recorder(lora) if trace and lora is not None else None
        logits, _, hidden = self._model(state)(
            ids, mask, lora=rec or lora, logits_at=logits_at, hidden_layer=hidden_layer,
            constrain=self._constrain)
        return logits, hidden, (rec.aux if rec is not None else {})

    def _score_impl(self, state, ids, mask, target_mask, lora):
        logits, _, _ = self._model(state)(ids, mask, lora=lora, constrain=self._constrain)
        lp = log_softmax_gather(logits[:, :-1], ids[:, 1:])  # B T-1
        tm = target_mask[:, 1:].astype(jnp.float32)
        return jnp.sum(lp * tm, axis=1), lp * tm

    def _generate_impl(self, state, ids, mask, key, temperature, top_p, stop_ids, max_tokens,
                       lora, *, cache_size, max_new, greedy):
        model = self._model(state)
        b = ids.shape[0]
        cache = KVCache.empty(self.config, b, cache_size, model.dtype)
        logits, cache, _ = model(ids, mask, cache=cache, lora=lora, logits_at="last",
                                 constrain=self._constrain)
        key, sub = jax.random.split(key)
        tok = _sample(logits[:, 0], sub, temperature, top_p, greedy)
        out = jnp.zeros((b, max_new), jnp.int32)
        done = jnp.zeros((b,), bool)
        lengths = jnp.zeros((b,), jnp.int32)

        def record(step, tok, out, done, lengths):
            out = out.at[:, step].set(jnp.where(done, 0, tok))
            lengths = jnp.where(done, lengths, step + 1)
            done = done | jnp.any(tok[:, None] == stop_ids[None, :], axis=1)
            return out, done, lengths

        out, done, lengths = record(0, tok, out, done, lengths)

        def cond(carry):
            step, _, _, _, done, _, _ = carry
            return (step < max_tokens) & ~jnp.all(done)

        def body(carry):
            step, tok, cache, out, done, lengths, key = carry
            logits, cache, _ = model(tok[:, None], jnp.ones((b, 1), bool), cache=cache,
                                     lora=lora, logits_at="last", constrain=self._constrain)
            key, sub = jax.random.split(key)
            tok = _sample(logits[:, 0], sub, temperature, top_p, greedy)
            out, done, lengths = record(step, tok, out, done, lengths)
            return step + 1, tok, cache, out, done, lengths, key

        carry = (jnp.ones((), jnp.int32), tok, cache, out, done, lengths, key)
        _, _, _, out, done, lengths, _ = jax.lax.while_loop(cond, body, carry)
        return out, lengths

    # -- public API ----------------------------------------------------------------------
    def _place(self, *arrays):
        if self.mesh is None:
            return tuple(jnp.asarray(a) for a in arrays)
        return tuple(jax.device_put(a, shd.batch_sharding(self.mesh, np.shape(a))) for a in arrays)

    def forward(self, input_ids, attention_mask=None, *, lora=None, logits_at: str = "all",
                hidden_layer: int | None = None, trace: bool = False):
        """Logits `[B, T, V]` (float32); with `hidden_layer`, also that layer's hidden states;
        with `trace=True` (and a hook that has `with_aux`), also the hook's per-module routing
        trace `{"<layer>.<module>": {...}, "attention_mask": [B, T]}` (e.g. ROCs fired per token
        and candidate; padding positions are included, mask them with `attention_mask`)."""
        input_ids = np.asarray(input_ids, np.int32)
        if attention_mask is None:
            attention_mask = np.ones(input_ids.shape, bool)
        self._check_length(input_ids.shape[1])
        ids, mask = self._place(input_ids, np.asarray(attention_mask, bool))
        logits, hidden, aux = self._forward(self.state, ids, mask, lora, logits_at=logits_at,
                                            hidden_layer=hidden_layer, trace=trace)
        if trace:
            aux = {**aux, "attention_mask": np.asarray(attention_mask, bool)}
        out = (logits,) + ((hidden,) if hidden_layer is not None else ()) + ((aux,) if trace else ())
        return out if len(out) > 1 else logits

    def score(self, input_ids, attention_mask, target_mask, *, lora=None):
        """Summed log-prob `[B]` of the tokens where `target_mask` is set (continuations), and
        per-token log-probs `[B, T-1]` (position t scores token t+1)."""
        self._check_length(np.shape(input_ids)[1])
        ids, mask, tm = self._place(np.asarray(input_ids, np.int32),
                                    np.asarray(attention_mask, bool), np.asarray(target_mask, bool))
        return self._score(self.state, ids, mask, tm, lora)

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_p: float = 1.0,
        key: jax.Array | None = None,
        stop_tokens: Sequence[int] | None = None,
        pad_id: int = 0,
        lora=None,
        prompt_bucket: int | None = None,
    ) -> GenerationOutput:
        """Generate for a batch of token-id prompts (left-padded into a length bucket)."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate needs a non-empty batch of non-empty prompts")
        t = prompt_bucket or bucket_length(max(len(p) for p in prompts))
        new_bucket = bucket_length(max_new_tokens, minimum=16, multiple=64)
        self._check_length(t + new_bucket)
        ids, mask = pad_batch(prompts, t, pad_id, side="left")
        stops = list(stop_tokens if stop_tokens is not None else self.config.eos_token_id) or [-1]
        stop_ids = jnp.asarray(stops, jnp.int32)
        greedy = temperature <= 0.0
        if key is None:
            if not greedy:
                raise ValueError("sampling (temperature > 0) needs an explicit PRNG `key`")
            key = jax.random.key(0)
        ids, mask = self._place(ids, mask)
        out, lengths = self._generate(
            self.state, ids, mask, key, jnp.float32(temperature), jnp.float32(top_p), stop_ids,
            jnp.int32(max_new_tokens), lora, cache_size=t + new_bucket, max_new=new_bucket,
            greedy=greedy)
        out = np.array(out)[:, :max_new_tokens]
        lengths = np.minimum(np.asarray(lengths), max_new_tokens)
        for i, n in enumerate(lengths):
            out[i, n:] = pad_id
        return GenerationOutput(tokens=out, lengths=lengths)

    def _check_length(self, n: int):
        if n > self.config.max_position_embeddings:
            raise ValueError(
                f"input of {n} tokens (with generation bucket) exceeds the model's "
                f"max_position_embeddings={self.config.max_position_embeddings}")
