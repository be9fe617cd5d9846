"""Jitted T5 inference: teacher-forced logits, greedy / sampled generation, choice scoring.

The model is split once (`nnx.split`); each entry point is a pure function of
`(state, inputs, lora)` compiled once per shape. Generation encodes the (padded) batch once,
computes every decoder layer's cross-attention keys/values once (`init_cache`), then decodes inside
one `jax.lax.while_loop` with a self-attention KV cache, stopping early when every row has hit a
stop token (greedy, or temperature / top-p sampling from an explicit PRNG key). Encoder inputs may
be padded on either side (T5 positions are relative; padded keys are masked).

`T5Engine.forward(..., trace=True)` also returns the hook's per-module routing trace of every
encoder and decoder row (`inference._Recorder`, as `Engine.forward`).

Multiple-choice scoring runs the encoder once per example and scores every choice as the
decoder target (`[start] + choice[:-1]` in, `choice` as labels): the summed log-probability,
as transformers' loss with `labels` gives it (`-loss * number of target tokens`); with
`greedy=True` also whether every target token is the argmax (lm-eval's is_greedy: the lm-eval
backend scores seq2seq log-likelihoods with `score_targets`).

With a mesh, parameters carry the T5 rules table's shardings (`hilora_jax.t5.load`), inputs are
sharded over `data`, and block outputs are constrained to the activation layout.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from hilora_jax.inference import (
    GenerationOutput,
    SplitEngine,
    _Recorder,
    _sample,
    call_with_options,
    finish_generation,
    pad_batch,
    step_jit,
)
from hilora_jax.model import sharding as shd
from hilora_jax.t5.model import DecoderCache, T5ForConditionalGeneration


def decoder_cache_sharding(mesh: Mesh, cache: DecoderCache) -> DecoderCache:
    """`NamedSharding`s of a `DecoderCache` (arrays or `ShapeDtypeStruct`s) on `mesh`, from the
    rules table: self- and cross-attention K/V `[B, S, N, H]` as (batch, seq, kv_heads, -), the
    masks `[B, S]` as batch, the write index replicated."""
    kv = NamedSharding(mesh, shd.logical_to_spec(("batch", "seq", "kv_heads", None),
                                                 cache.k[0].shape, mesh, what="decoder cache"))
    ckv = NamedSharding(mesh, shd.logical_to_spec(("batch", "seq", "kv_heads", None),
                                                  cache.cross_k[0].shape, mesh,
                                                  what="cross-attention cache"))
    return DecoderCache(k=[kv] * len(cache.k), v=[kv] * len(cache.v),
                        valid=shd.batch_sharding(mesh, cache.valid.shape),
                        index=shd.replicated(mesh), cross_k=[ckv] * len(cache.cross_k),
                        cross_v=[ckv] * len(cache.cross_v),
                        enc_mask=shd.batch_sharding(mesh, cache.enc_mask.shape))


def _constrain_cache(cache: DecoderCache, mesh: Mesh | None) -> DecoderCache:
    if mesh is None:
        return cache
    return jax.lax.with_sharding_constraint(cache, decoder_cache_sharding(mesh, cache))


def prefill(graphdef, state, ids, mask, lora, *, cache_size: int, mesh: Mesh | None = None
            ) -> DecoderCache:
    """Encoder stage of generation: encode `ids [B, T]` (`mask`) once and compute every decoder
    layer's cross-attention K/V into a fresh `DecoderCache` of `cache_size` self-attention slots.
    Pure: `T5Engine.generate` and `hilora aot` use exactly this."""
    model = nnx.merge(graphdef, state)
    enc = model.encode(ids, mask, lora=lora, constrain=shd.make_constrain(mesh))
    return _constrain_cache(model.init_cache(enc, mask, cache_size, lora=lora), mesh)


def decode_step(graphdef, state, tok, cache: DecoderCache, lora, *, mesh: Mesh | None = None):
    """One decoder step: append token `tok [B]` to `cache`; returns `(logits [B, V], cache)`.
    Pure: `T5Engine.generate`'s decode loop and `hilora aot` use exactly this."""
    model = nnx.merge(graphdef, state)
    logits, cache = model.decode(tok[:, None], cache, lora=lora,
                                 constrain=shd.make_constrain(mesh), logits_at="last")
    return logits[:, 0], _constrain_cache(cache, mesh)


# Compiled step functions (graphdef and mesh static; the decode step donates its cache).
prefill_jit = jax.jit(prefill, static_argnums=(0,), static_argnames=("cache_size", "mesh"))
decode_step_jit = step_jit(decode_step, "cpu")  # `step_jit(decode_step, "tpu")` for a TPU


class T5Engine(SplitEngine):
    """Split-once, jit-compiled inference over a `T5ForConditionalGeneration` (the split, `place`
    and length check are `hilora_jax.inference.SplitEngine`'s, shared with `Engine`)."""

    _GENERATE_STATIC = ("max_new", "greedy")

    def __init__(self, model: T5ForConditionalGeneration, mesh: Mesh | None = None):
        super().__init__(model, mesh)
        self._forward = jax.jit(self._forward_impl, static_argnames=("trace",))
        self._encode = jax.jit(self._encode_impl)
        self._score = jax.jit(self._score_impl, static_argnames=("greedy",))
        self._generate = self.generate_jit(self._platform)  # TPU: with the decode options

    # -- pure functions ----------------------------------------------------------------------
    def _encode_impl(self, state, ids, mask, lora):
        return self._model(state).encode(ids, mask, lora=lora, constrain=self._constrain)

    def _forward_impl(self, state, ids, mask, dec_ids, dec_mask, lora, trace=False):
        rec = _Recorder(lora) if trace and lora is not None else None
        logits = self._model(state)(ids, mask, dec_ids, dec_mask, lora=rec or lora,
                                    constrain=self._constrain)
        return logits, (rec.aux if rec is not None else {})

    def _score_impl(self, state, ids, mask, targets, target_mask, lora, greedy=False):
        """ids/mask `[B, T]`; targets/target_mask `[B, C, L]` -> summed log-probs `[B, C]`
        (with `greedy`, also whether every target token is the argmax `[B, C]`).

        The encoder and the cross-attention K/V run once per example; each choice is decoded as
        a batch of the same `B` rows, so a per-row routed hook (oracle, HiLoRA decisions `[B, ...]`)
        stays aligned with its rows."""
        model = self._model(state)
        b, c, n = targets.shape
        enc = model.encode(ids, mask, lora=lora, constrain=self._constrain)  # once per example
        cache = model.init_cache(enc, mask, n, lora=lora)
        start = jnp.full((b, 1), self.config.decoder_start_token_id, targets.dtype)
        out, top = [], []
        for j in range(c):
            tgt, tmask = targets[:, j], target_mask[:, j]
            dec_in = jnp.concatenate([start, tgt[:, :-1]], axis=1)
            dec_mask = jnp.concatenate([jnp.ones((b, 1), bool), tmask[:, :-1]], axis=1)
            logits, _ = model.decode(dec_in, cache, dec_mask, lora=lora,
                                     constrain=self._constrain)
            lp = jax.nn.log_softmax(logits, axis=-1)
            tok_lp = jnp.take_along_axis(lp, tgt[..., None], axis=-1)[..., 0]
            out.append(jnp.sum(jnp.where(tmask, tok_lp, 0.0), axis=-1))
            if greedy:
                top.append(jnp.all(jnp.where(tmask, jnp.argmax(logits, -1) == tgt, True), -1))
        if greedy:
            return jnp.stack(out, axis=1), jnp.stack(top, axis=1)
        return jnp.stack(out, axis=1)

    def _generate_impl(self, state, ids, mask, key, temperature, top_p, stop_ids, max_tokens,
                       lora, *, max_new, greedy):
        b = ids.shape[0]
        cache = prefill(self.graphdef, state, ids, mask, lora, cache_size=max_new, mesh=self.mesh)
        start = jnp.full((b,), self.config.decoder_start_token_id, jnp.int32)

        def step_logits(tok, cache):
            return decode_step(self.graphdef, state, tok, cache, lora, mesh=self.mesh)

        def record(step, tok, out, done, lengths):
            out = out.at[:, step].set(jnp.where(done, 0, tok))
            lengths = jnp.where(done, lengths, step + 1)
            done = done | jnp.any(tok[:, None] == stop_ids[None, :], axis=1)
            return out, done, lengths

        def cond(carry):
            step, _, _, _, done, _, _ = carry
            return (step < max_tokens) & ~jnp.all(done)

        def body(carry):
            step, tok, cache, out, done, lengths, key = carry
            logits, cache = step_logits(tok, cache)
            key, sub = jax.random.split(key)
            tok = _sample(logits, sub, temperature, top_p, greedy)
            out, done, lengths = record(step, tok, out, done, lengths)
            return step + 1, tok, cache, out, done, lengths, key

        out = jnp.zeros((b, max_new), jnp.int32)
        carry = (jnp.zeros((), jnp.int32), start, cache, out, jnp.zeros((b,), bool),
                 jnp.zeros((b,), jnp.int32), key)
        _, _, _, out, _, lengths, _ = jax.lax.while_loop(cond, body, carry)
        return out, lengths

    # -- public API ----------------------------------------------------------------------------
    def encode(self, input_ids, attention_mask=None, *, lora=None):
        """Encoder output `[B, T, D]` (after the final layer norm)."""
        ids = np.asarray(input_ids, np.int32)
        mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask, bool)
        return self._encode(self.state, *self.place(ids, mask), lora)

    def forward(self, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask=None,
                *, lora=None, trace: bool = False):
        """Teacher-forced logits `[B, Td, V]` float32 (HF's forward with `decoder_input_ids`).

        With `trace=True`, returns `(logits, trace)`: the hook's per-module routing trace as
        `Engine.forward` gives it, `{"<block>.<row>": {...}}` for every adapted encoder and decoder
        row (e.g. `"1.encoder.SelfAttention.q"`, `"0.decoder.EncDecAttention.k"`; HiLoRA: ROCs
        fired per token and candidate `fired [B, T, C]` and `n_module [B, C]`, T being the encoder
        length for encoder rows and cross-attention k/v, the decoder length otherwise), plus
        `"attention_mask"` `[B, Te]` and `"decoder_attention_mask"` `[B, Td]` (padding positions
        are included in the trace; mask them with these)."""
        ids = np.asarray(input_ids, np.int32)
        mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask, bool)
        dids = np.asarray(decoder_input_ids, np.int32)
        dmask = (np.ones(dids.shape, bool) if decoder_attention_mask is None
                 else np.asarray(decoder_attention_mask, bool))
        logits, aux = self._forward(self.state, *self.place(ids, mask, dids, dmask), lora,
                                    trace=trace)
        if not trace:
            return logits
        return logits, {**aux, "attention_mask": mask, "decoder_attention_mask": dmask}

    def score_choices(self, prompts: Sequence[Sequence[int]],
                      choices: Sequence[Sequence[Sequence[int]]], *, lora=None,
                      pad_id: int | None = None) -> np.ndarray:
        """Summed log-prob `[B, C]` of each choice (token ids) as the decoder target of its
        prompt. Every example needs the same number of choices, each non-empty."""
        if not prompts or len(prompts) != len(choices):
            raise ValueError("score_choices needs one list of choices per prompt")
        c = len(choices[0])
        if c == 0 or any(len(ch) != c for ch in choices):
            raise ValueError("every prompt needs the same, non-zero number of choices")
        if any(len(x) == 0 for ch in choices for x in ch) or any(len(p) == 0 for p in prompts):
            raise ValueError("prompts and choices must be non-empty token lists")
        pad = self.config.pad_token_id if pad_id is None else pad_id
        pad = 0 if pad is None else pad
        ids, mask = pad_batch(prompts, max(len(p) for p in prompts), pad, side="right")
        n = max(len(x) for ch in choices for x in ch)
        tgt = np.full((len(prompts), c, n), pad, np.int32)
        tm = np.zeros((len(prompts), c, n), bool)
        for i, ch in enumerate(choices):
            for j, x in enumerate(ch):
                tgt[i, j, :len(x)] = x
                tm[i, j, :len(x)] = True
        return self.score_targets(ids, mask, tgt, tm, lora=lora)

    def score_targets(self, input_ids, attention_mask, targets, target_mask, *, lora=None,
                      greedy: bool = False):
        """Summed log-prob `[B, C]` of padded decoder targets `[B, C, L]` (`target_mask` marks
        their tokens) given encoder inputs `[B, T]`: the array form of `score_choices` (and of the
        lm-eval backend's seq2seq log-likelihoods). `greedy=True` returns `(logprobs, is_greedy)`,
        `is_greedy [B, C]`: every target token is the argmax of its position."""
        ids, mask = self.place(np.asarray(input_ids, np.int32), np.asarray(attention_mask, bool))
        tgt, tm = jnp.asarray(np.asarray(targets, np.int32)), jnp.asarray(np.asarray(target_mask,
                                                                                     bool))
        out = self._score(self.state, ids, mask, tgt, tm, lora, greedy=greedy)
        if greedy:
            return np.asarray(out[0]), np.asarray(out[1])
        return np.asarray(out)

    def mc_scorer(self) -> T5ChoiceScorer:
        """The scorer `eval.runner.evaluate` uses for this engine (`T5ChoiceScorer`)."""
        return T5ChoiceScorer(self)

    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 32,
                 temperature: float = 0.0, top_p: float = 1.0, key: jax.Array | None = None,
                 stop_tokens: Sequence[int] | None = None, pad_id: int | None = None, lora=None,
                 prompt_bucket: int | None = None) -> GenerationOutput:
        """Generate for a batch of token-id prompts (right-padded into a length bucket).

        Returns `GenerationOutput`: tokens `[B, max_new_tokens]` (without the decoder start
        token; `pad_id` after a stop token) and per-row lengths (including the stop token)."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        pad = self.config.pad_token_id if pad_id is None else pad_id
        pad = 0 if pad is None else pad
        ids, mask, _, new_bucket, stop_ids, key, greedy = self._generation_inputs(
            prompts, max_new_tokens=max_new_tokens, temperature=temperature, key=key,
            stop_tokens=stop_tokens, pad_id=pad, prompt_bucket=prompt_bucket, side="right")
        out, lengths = call_with_options(
            lambda: self.generate_jit(self._platform), self._platform,
            self.state, ids, mask, key, jnp.float32(temperature), jnp.float32(top_p),
            stop_ids, jnp.int32(max_new_tokens), lora, max_new=new_bucket, greedy=greedy)
        return finish_generation(out, lengths, max_new_tokens, pad)


class T5ChoiceScorer:
    """Multiple-choice scoring of `eval.tasks.MCBatch` rows (prompt + choice, left-padded, the
    choice marked by `target_mask`) on T5: the prompt is the encoder input (the choice tokens are
    masked out as keys), the choice the decoder target (`score_targets`, one choice per row, so a
    per-row routed hook stays aligned). `layer = 0`: no shared prefix (`eval.runner`)."""

    layer = 0

    def __init__(self, engine: T5Engine):
        self.engine = engine

    def batch(self, b, lora=None) -> np.ndarray:
        """Summed choice log-probs `[B]` of one batch."""
        ids = np.asarray(b.input_ids, np.int32)
        mask = np.asarray(b.attention_mask, bool)
        tm = np.asarray(b.target_mask, bool)
        n = max(int(b.tail), int(tm.sum(1).max()))
        pad = self.engine.config.pad_token_id or 0
        tgt = np.full((ids.shape[0], 1, n), pad, np.int32)
        tmask = np.zeros((ids.shape[0], 1, n), bool)
        for r in range(ids.shape[0]):
            c = ids[r, tm[r]]
            tgt[r, 0, :len(c)] = c
            tmask[r, 0, :len(c)] = True
        return self.engine.score_targets(ids, mask & ~tm, tgt, tmask, lora=lora)[:, 0]
