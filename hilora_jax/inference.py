"""Jitted inference entry points: forward, score (log-probs of continuations) and generate.

Scoring has one path, `Engine.score` (over `tail_logprobs`): the last `tail` positions only go
through the final norm and the LM head; optionally resumed from cached hidden states of a layer
(prefix reuse). Multiple-choice scoring (`eval.tasks.ChoiceScorer`), router evaluation
(`eval.runner.PrefixScorer`), the trainer's loss and the lm-eval backend (`lmeval`, with
`targets=` and `greedy=`) all use it; batches are placed on the mesh by
`Engine.place`, the one batch placement.

The model is split once (`nnx.split`) into a static graph definition and a state pytree; each
entry point is a pure function of `(state, inputs, lora)` compiled once per shape bucket with
`jax.jit`. The LoRA hook (`lora`) is a pytree argument: new pools of the same shape, new gates or new
routing decisions never recompile.

Generation left-pads prompts into fixed length buckets (so new prompt lengths reuse compiled
code), prefills a KV cache, and decodes inside one `jax.lax.while_loop` (greedy, or temperature /
top-p sampling with an explicit PRNG key), stopping early when every row hit a stop token (the stop
ids padded to a multiple of 8, `stop_id_array`, so a new number of stop tokens does not recompile).

The two stages are module-level pure functions, `prefill` and `decode_step` (graph definition and
mesh static): `Engine.generate` composes exactly them, `Engine.prefill` / `Engine.decode_step` run
them alone (`prefill_jit`, `decode_step_jit`, the cache donated), and `hilora aot`
(`hilora_jax.aot`) lowers the same jitted functions with abstract, sharded arguments. With a mesh
the KV cache carries the rules table's sharding (`kv_cache_sharding`: batch over `data`, kv heads
over `model`) and is kept in the model's dtype.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from hilora_jax.model import sharding as shd
from hilora_jax.model.hook import LoraHook
from hilora_jax.model.layers import log_softmax_gather
from hilora_jax.model.llama import CausalLM, KVCache


def tail_logprobs(model: CausalLM, input_ids, attention_mask, tail: int, lora=None,
                  constrain=None, *, start_layer: int = 0, hidden_in=None, targets=None,
                  greedy: bool = False):
    """Log-probs `[B, K]` of the last `tail` tokens of each row (K = tail), given everything
    before them.

    Only the hidden states of the `K` scored positions go through the final norm and the LM head,
    so the `[B, T, V]` logits are never built. Without `targets`, entry `[b, k]` is
    `log p(ids[b, T-K+k] | ids[b, :T-K+k])` (positions `T-K-1 .. T-2` predict the row's own last
    K tokens). With `targets [B, T]` (the next token after every position, lm-eval's layout where
    the row holds the input minus its final token), entry `[b, k]` is
    `log p(targets[b, T-K+k] | ids[b, :T-K+k+1])` (positions `T-K .. T-1`). With `greedy=True`
    also returns whether each scored token is the argmax `[B, K]`. With `start_layer=k,
    hidden_in=h` the model resumes from cached layer-k hidden states. Pure function of its
    arguments (differentiable in `lora`); used by `Engine.score`, the trainer and lm-eval.
    """
    if (start_layer > 0) != (hidden_in is not None):
        raise ValueError("start_layer > 0 and hidden_in go together")
    x = model.embed(input_ids, constrain) if hidden_in is None else hidden_in  # B T D
    pos = model.positions(attention_mask.astype(bool), dtype=x.dtype)
    x, _, _ = model.run_layers(x, pos, start_layer, lora=lora, constrain=constrain)
    if targets is None:
        logits, tgt = model.head(x[:, -tail - 1:-1]), input_ids[:, -tail:]  # B K V: scored only
    else:
        logits, tgt = model.head(x[:, -tail:]), targets[:, -tail:]
    lp = log_softmax_gather(logits, tgt)  # B K
    if greedy:
        return lp, jnp.argmax(logits, axis=-1) == tgt
    return lp


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


def stop_id_array(stop_tokens: Sequence[int]) -> jax.Array:
    """The stop ids of a generate call as an int32 array padded with -1 (never generated) to a
    multiple of 8 (eight -1 when there are none): a different number of stop tokens (lm-eval's
    per-task `until`) reuses the compiled decode loop. Used by every `generate`
    (`SplitEngine._generation_inputs`)."""
    stops = [int(s) for s in stop_tokens]
    stops += [-1] * (-len(stops) % 8 if stops else 8)
    return jnp.asarray(stops, jnp.int32)


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


class _Recorder(LoraHook):
    """Wraps a hook during tracing and collects its per-module routing traces (returned by jit;
    calls without a trace record nothing)."""

    def __init__(self, hook: LoraHook):
        self.hook = hook
        self.aux: dict = {}

    def deltas(self, layer, names, x):
        outs = self.hook.deltas(layer, names, x)
        for name, out in zip(names, outs, strict=True):
            if out is not None and out[1]:
                self.aux[f"{layer}.{name}"] = out[1]
        return outs

    def delta(self, layer, name, x):
        return self.deltas(layer, (name,), x)[0]


def kv_cache_sharding(mesh: Mesh, cache: KVCache) -> KVCache:
    """`NamedSharding`s for a `KVCache` (of arrays or `ShapeDtypeStruct`s) on `mesh`, from the rules
    table: k/v `[B, S, K, H]` as (batch, seq, kv_heads, -), positions and validity `[B, S]` as
    (batch, seq), the write index replicated."""
    kv = NamedSharding(mesh, shd.logical_to_spec(("batch", "seq", "kv_heads", None),
                                                 cache.k[0].shape, mesh, what="kv cache"))
    tok = shd.batch_sharding(mesh, cache.pos.shape)
    return KVCache(k=[kv] * len(cache.k), v=[kv] * len(cache.v), pos=tok, valid=tok,
                   index=shd.replicated(mesh))


def _constrain_cache(cache: KVCache, mesh: Mesh | None) -> KVCache:
    if mesh is None:
        return cache
    return jax.lax.with_sharding_constraint(cache, kv_cache_sharding(mesh, cache))


def prefill(graphdef, state, ids, mask, lora, *, cache_size: int, mesh: Mesh | None = None):
    """Prompt stage of generation: run `ids [B, T]` (left-padded, `mask`) through the model into a
    fresh KV cache of `cache_size` slots (in the model's dtype). Returns `(logits [B, V] float32 of
    the last position, cache)`. Pure: `Engine.generate` and `hilora aot` use exactly this."""
    model = nnx.merge(graphdef, state)
    cache = _constrain_cache(KVCache.empty(model.config, ids.shape[0], cache_size, model.dtype),
                             mesh)
    logits, cache = model(ids, mask, cache=cache, lora=lora, logits_at="last",
                          constrain=shd.make_constrain(mesh))
    return logits[:, 0], _constrain_cache(cache, mesh)


def decode_step(graphdef, state, tok, cache, lora, *, mesh: Mesh | None = None):
    """One decode step: append token `tok [B]` to `cache`; returns `(logits [B, V], cache)`.
    Pure: `Engine.generate`'s decode loop and `hilora aot` use exactly this."""
    model = nnx.merge(graphdef, state)
    b = tok.shape[0]
    logits, cache = model(tok[:, None], jnp.ones((b, 1), bool), cache=cache, lora=lora,
                          logits_at="last", constrain=shd.make_constrain(mesh))
    return logits[:, 0], _constrain_cache(cache, mesh)


# The compiled step functions (graphdef and mesh are static; the decode step donates its cache so
# the update is in place). `Engine.prefill` / `Engine.decode_step` call these; `hilora aot` lowers
# them with abstract arguments.
prefill_jit = jax.jit(prefill, static_argnums=(0,), static_argnames=("cache_size", "mesh"))

# Compile options of a decode step, per backend. A decode step is memory-bound: every on-chip
# copy that its uses do not repay costs time. Two of XLA:TPU's memory-space assignment decisions
# made copies that did not (`hilora aot`, Llama-2-7B + 50 r=8 q/v LoRAs, 2048 + 128 cache slots;
# HBM bytes per step and device, estimated from the compiled HLO, `benchmarks/results/aot.md`):
# - "cross-program prefetch" copies the largest eligible parameter whole into on-chip memory on
#   every run; here that is a table the step only gathers rows of (the embedding, or a stacked
#   LoRA pool array `[L, A, R, D]`);
# - the KV cache of a layer was staged on chip for the attention reads and the whole layer's K/V
#   evicted back to HBM after the one-token update (61 such round trips per step in a batch-1
#   routed step). `xla_tpu_msa_inefficient_use_to_copy_ratio` = 1 refuses copies whose uses read
#   fewer bytes than the copy moves.
# With both: v5e-8 batch 1 hilora decode 1878 -> 1748 MiB (base 1714 -> 1712), int8 weights
# 1098 -> 962 MiB (base 928 -> 926); v6e-8 batch 8 3978 -> 2907 MiB (base 2716 -> 2682); v5e-8
# batch 8 2907 -> 2890 (base 2681 -> 2664). The prompt stage (compute-bound, `prefill_jit`) keeps
# XLA's defaults; `Engine.generate`'s single program (prompt stage + decode loop) gets the options
# (`SplitEngine.generate_jit`): its loop steps come down to the standalone step's bytes (v5e-8
# batch 8 hilora 3706 -> 2890 MiB), its prompt stage moves by <= 0.25%.
DECODE_STEP_OPTIONS = {"tpu": {"xla_max_cross_program_prefetches": 0,
                               "xla_tpu_msa_inefficient_use_to_copy_ratio": 1.0}}
_REJECTED_OPTIONS: set[str] = set()  # platforms whose compiler refused an option (other versions)


@functools.cache
def _jit_step(fn, options: tuple):
    return jax.jit(fn, static_argnums=(0,), static_argnames=("mesh",), donate_argnames=("cache",),
                   compiler_options=dict(options) or None)


def decode_options(platform: str) -> tuple:
    """`DECODE_STEP_OPTIONS[platform]` as a sorted tuple (empty once the compiler refused one)."""
    opts = {} if platform in _REJECTED_OPTIONS else DECODE_STEP_OPTIONS.get(platform, {})
    return tuple(sorted(opts.items()))


def step_jit(fn, platform: str):
    """A decode step `fn(graphdef, state, tok, cache, lora, *, mesh)` jitted for `platform`
    (graphdef and mesh static, the cache donated, `DECODE_STEP_OPTIONS[platform]`); one jitted
    function per set of options."""
    return _jit_step(fn, decode_options(platform))


def call_with_options(get_fn, platform: str, *args, **kw):
    """`get_fn()(*args, **kw)`, `get_fn` returning the program jitted with `decode_options
    (platform)`. A compiler that does not know one of the options (another libtpu version)
    compiles it with its defaults instead (`get_fn` is called again), with one warning."""
    try:
        return get_fn()(*args, **kw)
    except jax.errors.JaxRuntimeError as e:
        if "No such compile option" not in str(e) or platform in _REJECTED_OPTIONS:
            raise
        warnings.warn(f"hilora: the {platform} compiler refused the decode options "
                      f"{DECODE_STEP_OPTIONS.get(platform)} ({str(e).strip()[:200]}); compiling "
                      "with its defaults", RuntimeWarning, stacklevel=3)
        _REJECTED_OPTIONS.add(platform)
        return get_fn()(*args, **kw)


def run_step(fn, platform: str, *args, **kw):
    """`step_jit(fn, platform)(*args, **kw)`, falling back as `call_with_options` does."""
    return call_with_options(lambda: step_jit(fn, platform), platform, *args, **kw)


def platform_of(mesh: Mesh | None) -> str:
    """The backend a program on `mesh` (None: the default device) compiles for."""
    return (mesh.devices.flat[0] if mesh is not None else jax.devices()[0]).platform


decode_step_jit = step_jit(decode_step, "cpu")  # the step as CPU / GPU compile it


def decode_step_jit_for(platform: str):
    """The compiled decode step `Engine.decode_step` runs (and `hilora aot` lowers) on `platform`."""
    return step_jit(decode_step, platform)


def generate_loop(graphdef, state, ids, mask, key, temperature, top_p, stop_ids, max_tokens, lora,
                  *, cache_size: int, max_new: int, greedy: bool, mesh: Mesh | None = None):
    """`Engine.generate`'s program: prefill the prompt into a `cache_size` KV cache, sample the
    first token, then decode inside one `while_loop` until `max_tokens` or every row stopped
    (`stop_ids`). Returns `(tokens [B, max_new], lengths [B])`."""
    b = ids.shape[0]
    logits, cache = prefill(graphdef, state, ids, mask, lora, cache_size=cache_size,
                            mesh=mesh)
    key, sub = jax.random.split(key)
    tok = _sample(logits, sub, temperature, top_p, greedy)
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
        logits, cache = decode_step(graphdef, state, tok, cache, lora, mesh=mesh)
        key, sub = jax.random.split(key)
        tok = _sample(logits, sub, temperature, top_p, greedy)
        out, done, lengths = record(step, tok, out, done, lengths)
        return step + 1, tok, cache, out, done, lengths, key

    carry = (jnp.ones((), jnp.int32), tok, cache, out, done, lengths, key)
    _, _, _, out, done, lengths, _ = jax.lax.while_loop(cond, body, carry)
    return out, lengths


class SplitEngine:
    """The scaffolding every engine shares (`Engine` here, `hilora_jax.t5.generate.T5Engine`):
    the model split once into `graphdef` / `state` (`_model(state)` merges them inside jitted
    functions), the activation constraint of `mesh`, batch placement (`place`), the input
    length check against the config's `max_position_embeddings` (none when the family has
    relative positions and no such field, as T5) and the front of `generate`
    (`_generation_inputs`; `finish_generation` is the back)."""

    _GENERATE_STATIC: tuple[str, ...] = ()  # static keyword arguments of `_generate_impl`

    def __init__(self, model, mesh: Mesh | None = None):
        self.config = model.config
        self.mesh = mesh
        self.graphdef, self.state = nnx.split(model)
        self._constrain = shd.make_constrain(mesh)
        self._platform = platform_of(mesh)
        self._generate_jits: dict = {}  # options -> jitted generation program

    def generate_jit(self, platform: str):
        """The jitted generation program (`_generate_impl`: the prompt stage + the `while_loop`
        of decode steps; `generate_loop` for `Engine`) compiled for `platform` with
        `decode_options(platform)`: on TPU the loop's steps are memory-bound like `decode_step`'s,
        and the same options stop XLA from staging each layer's KV cache on chip and writing it
        back every step (`benchmarks/generate_loop_aot.py`: Llama-2-7B + 50 LoRAs, v5e-8 batch 8,
        hilora, estimated HBM traffic per loop step 3706 -> 2890 MiB; the prompt stage within
        0.25%).
        One jitted function per set of options."""
        opts = decode_options(platform)
        if opts not in self._generate_jits:
            self._generate_jits[opts] = jax.jit(
                self._generate_impl, static_argnames=self._GENERATE_STATIC,
                compiler_options=dict(opts) or None)
        return self._generate_jits[opts]

    def _model(self, state):
        return nnx.merge(self.graphdef, state)

    def place(self, *arrays):
        """Host batches on the engine's devices: dim 0 sharded over the mesh's `data` axis (when it
        divides), the rest replicated; without a mesh, the default device."""
        if self.mesh is None:
            return tuple(jnp.asarray(a) for a in arrays)
        return tuple(jax.device_put(a, shd.batch_sharding(self.mesh, np.shape(a))) for a in arrays)

    def _check_length(self, n: int):
        limit = getattr(self.config, "max_position_embeddings", None)
        if limit is not None and n > limit:
            raise ValueError(
                f"input of {n} tokens (with generation bucket) exceeds the model's "
                f"max_position_embeddings={limit}")

    def _generation_inputs(self, prompts, *, max_new_tokens: int, temperature: float, key,
                           stop_tokens, pad_id: int, prompt_bucket: int | None, side: str):
        """The front of every `generate`: prompts padded (`side`) into a length bucket and placed,
        the decode bucket, the stop ids (`stop_id_array`, default the config's eos), greedy or
        not and the PRNG key (sampling needs one). Returns `(ids, mask, prompt bucket, decode
        bucket, stop ids, key, greedy)`."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate needs a non-empty batch of non-empty prompts")
        t = prompt_bucket or bucket_length(max(len(p) for p in prompts))
        new_bucket = bucket_length(max_new_tokens, minimum=16, multiple=64)
        self._check_length(t + new_bucket)
        ids, mask = pad_batch(prompts, t, pad_id, side=side)
        stop_ids = stop_id_array(stop_tokens if stop_tokens is not None
                                 else self.config.eos_token_id)
        greedy = temperature <= 0.0
        if key is None:
            if not greedy:
                raise ValueError("sampling (temperature > 0) needs an explicit PRNG `key`")
            key = jax.random.key(0)
        ids, mask = self.place(ids, mask)
        return ids, mask, t, new_bucket, stop_ids, key, greedy


def finish_generation(out, lengths, max_new_tokens: int, pad_id: int) -> GenerationOutput:
    """The decode loop's `[B, bucket]` tokens and lengths cut to `max_new_tokens`, `pad_id` after
    each row's stop token (the back of every `generate`)."""
    out = np.array(out)[:, :max_new_tokens]
    lengths = np.minimum(np.asarray(lengths), max_new_tokens)
    for i, n in enumerate(lengths):
        out[i, n:] = pad_id
    return GenerationOutput(tokens=out, lengths=lengths)


class Engine(SplitEngine):
    """Split-once, jit-compiled inference over a `CausalLM` (optionally sharded over `mesh`)."""

    _GENERATE_STATIC = ("cache_size", "max_new", "greedy")

    def __init__(self, model: CausalLM, mesh: Mesh | None = None):
        super().__init__(model, mesh)
        self._forward = jax.jit(self._forward_impl,
                                static_argnames=("logits_at", "hidden_layer", "trace"))
        self._score = jax.jit(self._score_impl,
                              static_argnames=("tail", "start_layer", "greedy"))
        self._generate = self.generate_jit(self._platform)

    # -- pure functions ------------------------------------------------------------------
    def _forward_impl(self, state, ids, mask, lora, logits_at="all", hidden_layer=None,
                      trace=False):
        rec = _Recorder(lora) if trace and lora is not None else None
        model, hook, c = self._model(state), rec or lora, self._constrain
        hidden = None
        if hidden_layer is None:
            logits, _ = model(ids, mask, lora=hook, logits_at=logits_at, constrain=c)
        else:  # composed: layers [0, k) -> hidden, then [k, L) -> head unless logits_at="none"
            x = model.embed(ids, c)
            pos = model.positions(mask, dtype=x.dtype)
            hidden, _, _ = model.run_layers(x, pos, 0, hidden_layer, lora=hook, constrain=c)
            logits = None
            if logits_at != "none":
                x, _, _ = model.run_layers(hidden, pos, hidden_layer, lora=hook, constrain=c)
                logits = model.head(x[:, -1:] if logits_at == "last" else x, c)
        return logits, hidden, (rec.aux if rec is not None else {})

    def _score_impl(self, state, ids, mask, target_mask, lora, hidden, targets, *, tail,
                    start_layer, greedy):
        out = tail_logprobs(self._model(state), ids, mask, tail, lora, self._constrain,
                            start_layer=start_layer, hidden_in=hidden, targets=targets,
                            greedy=greedy)
        lp = out[0] if greedy else out  # B K
        tm = target_mask[:, -tail:]
        lp = lp * tm.astype(jnp.float32)
        if not greedy:
            return jnp.sum(lp, axis=1), lp
        return jnp.sum(lp, axis=1), lp, jnp.all(jnp.where(tm, out[1], True), axis=1)

    def _generate_impl(self, state, ids, mask, key, temperature, top_p, stop_ids, max_tokens,
                       lora, *, cache_size, max_new, greedy):
        return generate_loop(self.graphdef, state, ids, mask, key, temperature, top_p, stop_ids,
                             max_tokens, lora, cache_size=cache_size, max_new=max_new,
                             greedy=greedy, mesh=self.mesh)

    # -- public API ----------------------------------------------------------------------
    def prefill(self, ids, mask, *, cache_size: int, lora=None):
        """Prompt stage alone (the compiled `prefill_jit`): `(last logits [B, V], KVCache)`."""
        ids, mask = self.place(np.asarray(ids, np.int32), np.asarray(mask, bool))
        return prefill_jit(self.graphdef, self.state, ids, mask, lora, cache_size=cache_size,
                           mesh=self.mesh)

    def decode_step(self, tok, cache: KVCache, *, lora=None):
        """One decode step (`decode_step_jit_for` this engine's backend, with its
        `DECODE_STEP_OPTIONS`; `cache` is donated): `(logits [B, V], new cache)`."""
        (tok,) = self.place(np.asarray(tok, np.int32))
        return run_step(decode_step, platform_of(self.mesh), self.graphdef, self.state, tok,
                        cache, lora, mesh=self.mesh)

    def forward(self, input_ids, attention_mask=None, *, lora=None, logits_at: str = "all",
                hidden_layer: int | None = None, trace: bool = False):
        """Logits `[B, T, V]` (float32); with `hidden_layer`, also that layer's hidden states;
        with `trace=True`, also the hook's per-module routing
        trace `{"<layer>.<module>": {...}, "attention_mask": [B, T]}` (e.g. ROCs fired per token
        and candidate; padding positions are included, mask them with `attention_mask`)."""
        input_ids = np.asarray(input_ids, np.int32)
        if attention_mask is None:
            attention_mask = np.ones(input_ids.shape, bool)
        self._check_length(input_ids.shape[1])
        ids, mask = self.place(input_ids, np.asarray(attention_mask, bool))
        logits, hidden, aux = self._forward(self.state, ids, mask, lora, logits_at=logits_at,
                                            hidden_layer=hidden_layer, trace=trace)
        if trace:
            aux = {**aux, "attention_mask": np.asarray(attention_mask, bool)}
        out = (logits,) + ((hidden,) if hidden_layer is not None else ()) + ((aux,) if trace else ())
        return out if len(out) > 1 else logits

    def score(self, input_ids, attention_mask, target_mask, *, lora=None, tail: int | None = None,
              resume: tuple[int, np.ndarray] | None = None, targets=None, greedy: bool = False):
        """Summed log-prob `[B]` of the tokens where `target_mask` is set (continuations), and
        masked per-token log-probs `[B, K]` (entry k scores token `T-K+k`).

        `tail`: only the last `K = tail` tokens can be targets (left-padded continuations), so
        only those positions go through the LM head; default `T-1` (every position t scores token
        t+1). `resume=(layer, hidden [B, T, D])` starts from cached hidden states after `layer`
        (`forward(..., logits_at="none", hidden_layer=layer)` of the same rows): the prefix reuse
        of evaluation. `targets [B, T]`: score the next token after every position instead (rows
        hold the input minus its final token, lm-eval's layout; `target_mask` then marks positions
        whose next token counts, and `tail` may be `T`). `greedy=True` adds a third output `[B]`:
        every scored token is the argmax. One compile per (shape, tail, layer, greedy)."""
        t = np.shape(input_ids)[1]
        self._check_length(t)
        tail = (t if targets is not None else t - 1) if tail is None else int(tail)
        top = t if targets is not None else t - 1
        if not 0 < tail <= top:
            raise ValueError(f"tail must be in [1, {top}] for {t} tokens, got {tail}")
        arrays = [np.asarray(input_ids, np.int32), np.asarray(attention_mask, bool),
                  np.asarray(target_mask, bool)]
        if targets is not None:
            arrays.append(np.asarray(targets, np.int32))
        ids, mask, tm, *tg = self.place(*arrays)
        layer, hidden = (0, None) if resume is None else resume
        if layer > 0:
            (hidden,) = self.place(hidden)
        else:
            hidden = None
        return self._score(self.state, ids, mask, tm, lora, hidden, tg[0] if tg else None,
                           tail=tail, start_layer=layer, greedy=greedy)

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
        ids, mask, t, new_bucket, stop_ids, key, greedy = self._generation_inputs(
            prompts, max_new_tokens=max_new_tokens, temperature=temperature, key=key,
            stop_tokens=stop_tokens, pad_id=pad_id, prompt_bucket=prompt_bucket, side="left")
        out, lengths = call_with_options(
            lambda: self.generate_jit(self._platform), self._platform,
            self.state, ids, mask, key, jnp.float32(temperature), jnp.float32(top_p), stop_ids,
            jnp.int32(max_new_tokens), lora, cache_size=t + new_bucket, max_new=new_bucket,
            greedy=greedy)
        return finish_generation(out, lengths, max_new_tokens, pad_id)
