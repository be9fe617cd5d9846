"""Sequence level of HiLoRA: candidate LoRAs, ROC budget and allocation (method §2.3-2.5).

Pure, jittable, vmappable functions over arrays; computed once per prompt and reused for every
generated token. Static shapes throughout: the candidate axis has ``C = min(max_candidates, A)``
slots, sorted by score (descending; equal scores: lower adapter index first); unused slots have
``cand_valid = False``, ``cand_idx = 0`` and ``n_rocs = 0``.

Shape letters: the legend in ``hilora_jax.model.projections`` (B, A, C).

Rules (the method doc, with this module's resolutions marked [choice]):

1. Eligible adapters: ``active`` (protocol masking) and a finite score. [choice] Non-finite scores
   (e.g. ``-inf`` from a non-finite embedding, see ``gaussian.log_likelihood``) are ineligible; a
   row with no eligible adapter gets no candidates, budget 0 and ``n = 0`` (base model only).
2. If ``max s > 0``: ``C(x) = {s > 0}``; else the top-``c`` with ``c = max(ceil(|max s|), k)``,
   capped at the number of eligible adapters. Then ``|C|`` is capped at ``max_candidates`` keeping
   the highest scores; ``n_selected`` is ``|C|`` before that cap and ``cap_binds`` says it bound.
3. Budget ``O = max(min_budget, round(gamma * sum_{i in C} r_i))`` over the candidates actually kept
   (after the cap). [choice] ``round`` is round-half-up, computed exactly in integers from the
   decimal value of ``gamma`` (``Fraction(str(gamma))``), so the budget never depends on float
   error; ``O`` is also capped at ``sum_C r_i`` so the allocation always fits.
4. ``pi = softmax(s_C / tau)``. ``expected``: largest-remainder rounding of ``O pi`` (the leftover
   units go to the largest fractional parts; ties: higher ``pi``, then lower adapter index).
   ``sample``: ``n ~ Multinomial(O, pi)`` with one PRNG key per sequence.
5. Capacity ``n_i <= r_i``: [choice] all overflow is pooled and handed, unit by unit, to the most
   likely LoRA (highest ``pi``, ties lower index) that still has room. This equals "repeat: move the
   overflow to the next most likely LoRA with room" whenever overflow comes from the most likely
   LoRA (the usual case); it is order-independent otherwise. Since ``O <= sum_C r_i`` it always fits.

Calibrated rule (:func:`calibrated_decisions`, issue 13) [choice], on calibrated scores
``c_i`` (``gaussian.calibrated_scores``: 0 = as typical of LoRA i as the median of its own
held-out samples, in units of their standard deviation):

1'. Eligible as above. Candidates ``C(x) = {i : c_i >= floor and c_i >= max_j c_j - margin}``
    (sorted, at most ``max_candidates`` kept): few LoRAs when one clearly covers the input, a mix
    when several are about as typical, none when no LoRA's score reaches ``floor``.
2'. Coverage ``g(x) = clip((max c - floor) / (full_at - floor), 0, 1)``: 1 when the best LoRA finds
    the input at least as typical as ``full_at`` (default 0, its median held-out sample), falling
    linearly to 0 at the floor.
3'. ``pi = softmax(c_C / tau)``. Allocation ``relative`` (default): every candidate gets
    ``n_i = min(r_i, round(g r_i pi_i / max pi))`` ROCs (round-half-up; ``pi_i / max pi`` computed
    as ``exp((c_i - max c) / tau)``): the best candidate gets its full rank when the input is
    covered, a decisive expert (``pi ~ 1``) acts like its own LoRA, and each other candidate gets
    the share of its rank its likelihood ratio to the best one gives it. Allocation ``budget``:
    the paper's rule 3-5 with ``O = round(g gamma sum_C r_i)`` (may be 0).
    ``budget`` = ``sum n``; rows with no candidate get nothing (base model).

Keys for ``sample`` mode: either one key per row (``[B]`` typed keys or ``[B, 2]`` uint32 raw keys,
e.g. derived from a sequence id: the row's result then depends on nothing else), or a single key
that is folded with the row index (the result then depends on the row's position, never on the
contents of its batch-mates).
"""

# jaxtyping shape strings are not Python expressions (ruff F722 false positive).
# ruff: noqa: F722

from __future__ import annotations

from fractions import Fraction

import flax.struct
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

MODES = ("expected", "sample")
ALLOCATIONS = ("relative", "budget")


@flax.struct.dataclass
class SequenceDecision:
    """Per-sequence routing decision (C = min(max_candidates, A) slots, sorted by score desc).

    Fields:
      cand_idx:   [B, C] int32 adapter index of each slot (0 in unused slots).
      cand_valid: [B, C] bool, slot holds a candidate.
      n_rocs:     [B, C] int32 ROCs allotted to each candidate (0 in unused slots).
      budget:     [B] int32 total ROC budget O(x) (== n_rocs.sum(-1)).
      n_selected: [B] int32 |C(x)| before the max_candidates cap.
      cap_binds:  [B] bool, the max_candidates cap removed candidates.
      probs:      [B, C] float32 pi = softmax(s_C / tau) (0 in unused slots).
      cand_scores:[B, C] float32 s_i of each slot (-inf in unused slots).
      coverage:   [B] float32 g(x) of the calibrated rule (paper rule: 1 where any candidate).
    """

    cand_idx: Int[Array, "B C"]
    cand_valid: Bool[Array, "B C"]
    n_rocs: Int[Array, "B C"]
    budget: Int[Array, " B"]
    n_selected: Int[Array, " B"]
    cap_binds: Bool[Array, " B"]
    probs: Float[Array, "B C"]
    cand_scores: Float[Array, "B C"]
    coverage: Float[Array, " B"]


def _ranked(scores, ranks, active, c: int):
    """Shared prelude of the selection rules on `scores [B, A]`: ranks broadcast to `[B, A]`,
    eligible (active and finite), the scores with ineligible ones at -inf (and -0.0 as +0.0:
    `lax.top_k` orders by total order, -0.0 below +0.0, the rules by value), and the top `c`
    `(values, indices)` per row (equal scores: lower index first)."""
    b, a = scores.shape
    ranks = jnp.broadcast_to(jnp.asarray(ranks, jnp.int32), (b, a))
    eligible = jnp.broadcast_to(jnp.asarray(active, bool), (b, a)) & jnp.isfinite(scores)
    masked = jnp.where(eligible, jnp.where(scores == 0, 0.0, scores), -jnp.inf)
    top_s, top_idx = jax.lax.top_k(masked, c)  # [B, C]
    return ranks, eligible, masked, top_s, top_idx


def _gamma_fraction(gamma: float) -> Fraction:
    if not 0.0 < float(gamma) <= 1.0:
        raise ValueError(f"gamma must be in (0, 1], got {gamma}")
    frac = Fraction(str(float(gamma)))
    if frac.denominator > 10_000:
        frac = frac.limit_denominator(10_000)
    return frac


def round_half_up_ratio(num: Int[Array, ...], den: Int[Array, ...]) -> Int[Array, ...]:
    """``floor(num / den + 1/2)`` exactly, for non-negative int ``num`` and positive int ``den``."""
    return (2 * num + den) // (2 * den)


def largest_remainder(
    total: Int[Array, " B"], probs: Float[Array, "B C"], valid: Bool[Array, "B C"]
) -> Int[Array, "B C"]:
    """Largest-remainder rounding of ``total * probs`` over valid slots (sums to ``total``).

    Leftover units go to the largest fractional parts; ties by higher prob, then lower slot index
    (slots are sorted by score, so that is the lower adapter index among equal scores).
    """
    x = total[:, None].astype(jnp.float32) * probs  # [B, C]
    base = jnp.where(valid, jnp.floor(x), 0.0)
    frac = jnp.where(valid, x - base, -1.0)
    left = total - base.sum(-1).astype(jnp.int32)  # [B]
    c = probs.shape[-1]
    slot = jnp.arange(c)
    # beats[b, j, i]: slot j is ahead of slot i in the leftover queue.  [B, C, C]
    fj, fi = frac[:, :, None], frac[:, None, :]
    pj, pi = probs[:, :, None], probs[:, None, :]
    beats = (fj > fi) | ((fj == fi) & ((pj > pi) | ((pj == pi) & (slot[:, None] < slot[None, :]))))
    beats &= valid[:, :, None]
    queue_pos = beats.sum(1)  # [B, C]
    extra = valid & (queue_pos < left[:, None])
    return base.astype(jnp.int32) + extra.astype(jnp.int32)


def enforce_capacity(
    n: Int[Array, "B C"], cap: Int[Array, "B C"], valid: Bool[Array, "B C"]
) -> Int[Array, "B C"]:
    """Clip ``n`` at ``cap`` and pour the pooled overflow into slots with room, in slot order
    (slots are sorted by pi). Requires ``sum(n) <= sum(cap)`` per row to conserve the total."""
    n = jnp.where(valid, n, 0)
    cap = jnp.where(valid, cap, 0)
    over = jnp.sum(jnp.maximum(n - cap, 0), -1, keepdims=True)  # [B, 1]
    n = jnp.minimum(n, cap)
    room = cap - n
    room_before = jnp.cumsum(room, -1) - room  # [B, C]
    return n + jnp.clip(over - room_before, 0, room)


def _row_keys(key, batch: int):
    """Per-row keys: [B] typed or [B, 2] raw keys pass through; a single key is folded per row."""
    key = jnp.asarray(key) if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    single = key.ndim == (0 if typed else 1)
    if single:
        return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(batch))
    if key.shape[0] != batch:
        raise ValueError(f"need one key per sequence: got keys of shape {key.shape} for B={batch}")
    return key


def sequence_decisions(
    scores: Float[Array, "B A"],
    ranks: Int[Array, " A"] | Int[Array, "B A"],
    active: Bool[Array, " A"] | Bool[Array, "B A"],
    *,
    k: int = 3,
    gamma: float = 0.4,
    tau: float = 1.0,
    max_candidates: int = 8,
    mode: str = "expected",
    key: jax.Array | None = None,
    min_budget: int = 1,
) -> SequenceDecision:
    """HiLoRA sequence-level decision for each row (module docstring has the exact rules).

    Args:
      scores: [B, A] ``s_i(x)`` (``gaussian.scores``).
      ranks: [A] (or [B, A]) int rank r_i of each adapter (ROC count used for budget and capacity).
      active: [A] (or [B, A]) bool, adapters allowed for this evaluation (protocol masking).
      k, gamma, max_candidates, mode, min_budget: static Python values; tau may be traced.
      key: for ``mode="sample"``: per-row keys [B] / [B, 2], or one key folded with the row index.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if k < 1 or max_candidates < 1 or min_budget < 1:
        raise ValueError("k, max_candidates and min_budget must be >= 1")
    frac = _gamma_fraction(gamma)
    scores = jnp.asarray(scores, jnp.float32)
    b, a = scores.shape
    c = min(max_candidates, a)
    ranks, eligible, masked, top_s, top_idx = _ranked(scores, ranks, active, c)
    n_eligible = eligible.sum(-1)  # [B]
    s_max = top_s[:, 0]
    n_pos = (eligible & (scores > 0)).sum(-1)
    # c = max(ceil(|max s|), k), capped at the eligible count (clip in float: |max s| may be huge).
    c_neg = jnp.minimum(jnp.maximum(jnp.ceil(-s_max), k), n_eligible.astype(jnp.float32))
    n_selected = jnp.where(s_max > 0, n_pos, c_neg.astype(jnp.int32)).astype(jnp.int32)
    n_cand = jnp.minimum(n_selected, c)
    cand_valid = jnp.arange(c)[None, :] < n_cand[:, None]  # [B, C]
    cand_idx = jnp.where(cand_valid, top_idx, 0).astype(jnp.int32)
    cand_scores = jnp.where(cand_valid, top_s, -jnp.inf)
    cand_rank = jnp.where(cand_valid, jnp.take_along_axis(ranks, cand_idx, -1), 0)  # [B, C]

    rank_sum = cand_rank.sum(-1)  # [B]
    budget = round_half_up_ratio(frac.numerator * rank_sum, jnp.int32(frac.denominator))
    budget = jnp.minimum(jnp.maximum(budget, min_budget), rank_sum)  # 0 iff no candidates
    budget = budget.astype(jnp.int32)

    logits = jnp.where(cand_valid, cand_scores / tau, -jnp.inf)
    any_cand = n_cand > 0
    logits = jnp.where(any_cand[:, None], logits, 0.0)  # avoid NaN in empty rows
    probs = jnp.where(cand_valid, jax.nn.softmax(logits, -1), 0.0)

    if mode == "expected":
        n_raw = largest_remainder(budget, probs, cand_valid)
    else:
        if key is None:
            raise ValueError("mode='sample' needs a PRNG key")
        keys = _row_keys(key, b)
        p_safe = jnp.where(any_cand[:, None], probs, jnp.eye(1, c, dtype=probs.dtype))
        n_raw = jax.vmap(lambda kk, n, p: jax.random.multinomial(kk, n, p))(
            keys, budget.astype(jnp.float32), p_safe
        )
        n_raw = jnp.round(n_raw).astype(jnp.int32)
    n_rocs = enforce_capacity(n_raw, cand_rank, cand_valid)

    return SequenceDecision(
        cand_idx=cand_idx,
        cand_valid=cand_valid,
        n_rocs=n_rocs,
        budget=budget,
        n_selected=n_selected,
        cap_binds=n_selected > c,
        probs=probs,
        cand_scores=cand_scores,
        coverage=any_cand.astype(jnp.float32),
    )


def calibrated_decisions(
    cal: Float[Array, "B A"],
    ranks: Int[Array, " A"] | Int[Array, "B A"],
    active: Bool[Array, " A"] | Bool[Array, "B A"],
    *,
    floor: float = -3.0,
    margin: float = 3.0,
    full_at: float = 0.0,
    tau: float = 1.0,
    max_candidates: int = 8,
    allocation: str = "relative",
    gamma: float = 0.4,
) -> SequenceDecision:
    """Calibrated, adaptive sequence decision (module docstring, rules 1'-3'); pure and jittable.

    Args:
      cal: [B, A] calibrated scores ``c_i(x)`` (``gaussian.calibrated_scores``).
      ranks, active: as in :func:`sequence_decisions`.
      floor, margin, full_at: static thresholds in calibrated units (``floor < full_at``,
        ``margin >= 0``); tau may be traced.
      allocation: ``relative`` | ``budget`` (``gamma`` is used by ``budget`` only).
    """
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
    if max_candidates < 1:
        raise ValueError("max_candidates must be >= 1")
    if not float(floor) < float(full_at):
        raise ValueError(f"need floor < full_at, got floor={floor}, full_at={full_at}")
    if not float(margin) >= 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    frac = _gamma_fraction(gamma)
    cal = jnp.asarray(cal, jnp.float32)
    b, a = cal.shape
    c = min(max_candidates, a)
    ranks, eligible, masked, top_s, top_idx = _ranked(cal, ranks, active, c)
    c_max = top_s[:, :1]  # [B, 1]
    chosen = eligible & (masked >= floor) & (masked >= c_max - margin)  # [B, A]
    n_selected = chosen.sum(-1).astype(jnp.int32)
    n_cand = jnp.minimum(n_selected, c)
    cand_valid = jnp.arange(c)[None, :] < n_cand[:, None]
    cand_idx = jnp.where(cand_valid, top_idx, 0).astype(jnp.int32)
    cand_scores = jnp.where(cand_valid, top_s, -jnp.inf)
    cand_rank = jnp.where(cand_valid, jnp.take_along_axis(ranks, cand_idx, -1), 0)
    any_cand = n_cand > 0
    finite_max = jnp.where(any_cand, c_max[:, 0], floor)
    coverage = jnp.clip((finite_max - floor) / (full_at - floor), 0.0, 1.0)
    coverage = jnp.where(any_cand, coverage, 0.0).astype(jnp.float32)

    logits = jnp.where(cand_valid, cand_scores / tau, -jnp.inf)
    logits = jnp.where(any_cand[:, None], logits, 0.0)
    probs = jnp.where(cand_valid, jax.nn.softmax(logits, -1), 0.0)
    if allocation == "relative":
        rel = jnp.exp(jnp.where(cand_valid, (cand_scores - finite_max[:, None]) / tau, -jnp.inf))
        x = coverage[:, None] * cand_rank.astype(jnp.float32) * rel
        n_rocs = jnp.minimum(jnp.floor(x + 0.5).astype(jnp.int32), cand_rank)
        n_rocs = jnp.where(cand_valid, n_rocs, 0)
        budget = n_rocs.sum(-1).astype(jnp.int32)
    else:
        rank_sum = cand_rank.sum(-1)
        full = coverage * (frac.numerator * rank_sum).astype(jnp.float32) / frac.denominator
        budget = jnp.minimum(jnp.floor(full + 0.5).astype(jnp.int32), rank_sum)
        budget = jnp.where(any_cand, budget, 0).astype(jnp.int32)
        n_rocs = enforce_capacity(largest_remainder(budget, probs, cand_valid), cand_rank,
                                  cand_valid)
    return SequenceDecision(
        cand_idx=cand_idx,
        cand_valid=cand_valid,
        n_rocs=n_rocs,
        budget=budget,
        n_selected=n_selected,
        cap_binds=n_selected > c,
        probs=probs,
        cand_scores=cand_scores,
        coverage=coverage,
    )


def per_module_counts(
    n_rocs: Int[Array, "B C"],
    adapter_rank: Int[Array, " C"] | Int[Array, "B C"],
    module_rank: Int[Array, "B C"],
) -> Int[Array, "B C"]:
    """ROCs to keep in one module where its rank differs from the adapter's nominal rank [choice].

    ``round(n_i * module_rank / r_i)`` (round-half-up, exact integers), at least 1 where
    ``n_i > 0``, at most ``module_rank``; 0 where the module has no ROCs of that adapter
    (``module_rank == 0``) or ``n_i == 0``.
    """
    n = jnp.asarray(n_rocs, jnp.int32)
    mr = jnp.asarray(module_rank, jnp.int32)
    r = jnp.maximum(jnp.asarray(adapter_rank, jnp.int32), 1)
    out = round_half_up_ratio(n * mr, r)
    out = jnp.minimum(jnp.maximum(out, 1), mr)
    return jnp.where((n > 0) & (mr > 0), out, 0).astype(jnp.int32)
