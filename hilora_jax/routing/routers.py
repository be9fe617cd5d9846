"""Routers: HiLoRA and its baselines behind one interface.

`router.route(texts, ...) -> Routing` makes the *sequence-level* decisions for a batch of prompts
(host side: embed, score, select) and returns a hook pytree for the model plus an inspectable
`info` dict. The hook is passed to `Engine.forward/score/generate(lora=...)`; its token-level maths
runs inside the jitted model, in every adapted projection. Generation reuses the prompt's
sequence-level decisions for every decoded token; token-level choices are re-made per token.

Routers: `base`, `oracle` (named adapter per row), `uniform` (mixture or fusion), `retrieval`
(top-k by cosine to each LoRA's mean sample embedding; mixture or fusion), `arrow` (PEFT's Arrow),
`roc-fixed` (global top-24 ROCs per token), `hilora` (the method). Only the pool's *active*
adapters are ever used (`LoraPool.subset` for evaluation protocols, no recompilation).

State: a pool is a plain value. What routers derive from it on the host (sample embeddings per
embedder, Gaussian banks, Arrow prototypes) is built once, in the router's constructor (or on
first use for a new active set), and kept in a `RouterCache` the router holds: its own, or one the
caller passes (`build_router(..., cache=)`) so that several routers over one pool share the work.
What a router needs from evaluation beyond the prompt is declared, not guessed from its name:
`needs_task_labels` routers (oracle) get `adapter_names` per row.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import zlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hilora_jax.lora.pool import GatedHook, LoraPool
from hilora_jax.routing import gaussian as gs
from hilora_jax.routing.hooks import (
    PACK_WEIGHTS,
    STRATEGIES,
    ArrowHook,
    FusionHook,
    HiLoRAHook,
    RocFixedHook,
    arrow_prototypes,
    genknowsub,
    trim_slots,
)
from hilora_jax.routing.sequence import ALLOCATIONS, calibrated_decisions, sequence_decisions
from hilora_jax.routing.token import KAPPA_MODES, kappa


@dataclasses.dataclass
class Routing:
    """A batch's routing: the model hook (None = base model) and host-side info arrays."""

    hook: Any
    info: dict[str, np.ndarray]
    names: tuple[str, ...]

    def describe(self, i: int) -> str:
        """One line per row: which LoRAs (and how many ROCs) were used."""
        inf = self.info
        if "cand_idx" in inf:
            parts = [f"{self.names[a]}:{n}" for a, v, n in
                     zip(inf["cand_idx"][i], inf["cand_valid"][i], inf["n_rocs"][i], strict=True) if v and n > 0]
            cap = " (max_candidates cap bound)" if inf["cap_binds"][i] else ""
            cov = f", coverage {float(inf['coverage'][i]):.2f}" if "coverage" in inf else ""
            return (f"[hilora] budget {int(inf['budget'][i])} ROCs over {len(parts)} LoRAs: "
                    f"{', '.join(parts) or 'none (base model)'}{cap}{cov}")
        if "weights" in inf:
            w = inf["weights"][i]
            parts = [f"{self.names[a]}:{w[a]:.2f}" for a in np.argsort(-w) if w[a] > 0]
            return f"[{inf.get('router', 'mixture')}] {', '.join(parts) or 'none (base model)'}"
        return f"[{inf.get('router', '?')}] token-level routing over {len(self.names)} LoRAs"


class RouterCache:
    """Host-side routing state derived from pools, shared explicitly by the routers given it.

    Entries are keyed by what they depend on: sample embeddings by the embedder and the samples'
    texts, Gaussian banks by those and the fit options, Arrow prototypes by the pool arrays'
    identity (the entry keeps the arrays and is only reused for the very same ones). Make one and
    pass it to `build_router(..., cache=)` for several routers over one pool; a router built
    without one makes its own.
    """

    def __init__(self):
        self._entries: dict = {}

    def get(self, key, build, *, owner=None):
        """The entry for `key`, built by `build()` on a miss. With `owner`, an entry is reused
        only for the identical object (`is`), e.g. a pool's arrays."""
        hit = self._entries.get(key)
        if hit is not None and (owner is None or hit[0] is owner):
            return hit[1]
        value = build()
        self._entries[key] = (owner, value)
        return value

    def __len__(self) -> int:
        return len(self._entries)


def _samples_key(pool: LoraPool) -> tuple:
    return tuple((n, tuple(pool.samples[n] or ())) for n in pool.names)


class Router:
    name = "base"
    needs_samples = False
    # the router needs each row's task adapter (`route(..., adapter_names=)`); evaluation gives it
    needs_task_labels = False

    def __init__(self, pool: LoraPool | None, *, cache: RouterCache | None = None, **options):
        self.pool = pool
        self.cache = cache if cache is not None else RouterCache()
        if options:
            raise TypeError(f"router {self.name!r} got unknown options {sorted(options)}")
        if pool is not None and not np.asarray(pool.arrays.active).any():
            raise ValueError(f"router {self.name!r}: the pool has no active adapters (empty pool)")
        if self.needs_samples:
            pool.require_samples(self.name)

    def route(self, texts: Sequence[str], **kw) -> Routing:
        """Sequence-level routing for `texts`. Common keywords: `active` (bool `[A]`, overrides
        the pool's active set, e.g. per evaluation protocol; no recompilation) and, for routers
        that embed, `embeddings` (`[B, E]`, precomputed `E(texts)`)."""
        return Routing(None, {"router": self.name}, self.pool.names if self.pool else ())

    @property
    def _active(self) -> np.ndarray:
        return np.asarray(self.pool.arrays.active)

    def _active_for(self, active) -> np.ndarray:
        if active is None:
            return self._active
        a = np.asarray(active, bool)
        if a.shape != (len(self.pool),):
            raise ValueError(f"active must have shape ({len(self.pool)},), got {a.shape}")
        if not a.any():
            raise ValueError(f"router {self.name!r}: no active adapters left for this input")
        return a


class BaseRouter(Router):
    name = "base"

    def __init__(self, pool: LoraPool | None = None, **options):
        super().__init__(None, **options)
        self.pool = pool


class _WeightsRouter(Router):
    """Routers that weight whole adapters per sequence (`[B, A]`); mixture or fusion.

    Sparse routers (oracle, retrieval) gather their few adapters per row (`GatedHook` with
    `idx`); uniform mixes the whole pool (dense `GatedHook`)."""

    sparse = True

    def __init__(self, pool, *, combine: str = "mixture", **options):
        super().__init__(pool, **options)
        if combine not in ("mixture", "fusion"):
            raise ValueError(f"combine must be 'mixture' or 'fusion', got {combine!r}")
        self.combine = combine

    def _hook(self, w: np.ndarray, info: dict) -> Routing:
        info = {"router": self.name, "weights": w, **info}
        arr = self.pool.arrays
        if self.combine == "fusion":
            hook = FusionHook(arr, jnp.asarray(w, jnp.float32))
        elif self.sparse:  # few adapters per row: gather them (token cost independent of A)
            k = trim_slots(w)
            idx = np.argsort(-w, axis=1, kind="stable")[:, :k]
            hook = GatedHook(arr, jnp.asarray(np.take_along_axis(w, idx, 1), jnp.float32),
                             idx=jnp.asarray(idx, jnp.int32))
        else:
            hook = GatedHook(arr, jnp.asarray(w, jnp.float32))
        return Routing(hook, info, self.pool.names)


class OracleRouter(_WeightsRouter):
    """Each row uses the adapter named for it (`adapter_names=[...]`; None = base model)."""

    name = "oracle"
    needs_task_labels = True

    def route(self, texts, *, adapter_names: Sequence[str | None] | None = None, active=None,
              **kw):
        if adapter_names is None or len(adapter_names) != len(texts):
            raise ValueError("router 'oracle' needs adapter_names, one per prompt")
        act = self._active if active is None else np.asarray(active, bool)
        w = np.zeros((len(texts), len(self.pool)), np.float32)
        for i, n in enumerate(adapter_names):
            if n is not None:
                j = self.pool.index(n)
                if not act[j]:
                    raise ValueError(f"adapter {n!r} is not active in this pool view")
                w[i, j] = 1.0
        return self._hook(w, {})


class UniformRouter(_WeightsRouter):
    name = "uniform"
    sparse = False

    def route(self, texts, *, active=None, **kw):
        act = self._active_for(active).astype(np.float32)
        w = np.broadcast_to(act / act.sum(), (len(texts), len(act))).copy()
        return self._hook(w, {})


def _embedder_key(embedder) -> str:
    return getattr(embedder, "name", None) or f"{type(embedder).__name__}@{id(embedder)}"


class _EmbeddingRouter(Router):
    needs_samples = True

    def __init__(self, pool, *, embedder=None, **options):
        super().__init__(pool, **options)
        if embedder is None or isinstance(embedder, str):
            from hilora_jax.embed import load_embedder

            embedder = load_embedder(embedder or "minilm")
        self.embedder = embedder
        self.sample_embeddings = self.cache.get(
            ("sample_embeddings", _embedder_key(embedder), _samples_key(pool)),
            lambda: {n: _embed_checked(embedder, list(pool.samples[n]), f"samples of {n!r}")
                     for n in pool.names if pool.samples.get(n)})

    def embed(self, texts, embeddings=None) -> np.ndarray:
        if embeddings is not None:
            z = np.asarray(embeddings, np.float32)
            if z.shape[0] != len(texts):
                raise ValueError(f"{z.shape[0]} embeddings for {len(texts)} texts")
            gs.check_embeddings(z)
            return z
        return _embed_checked(self.embedder, list(texts), "input texts")


def _embed_checked(embedder, texts, what) -> np.ndarray:
    z = np.asarray(embedder(texts), np.float32)
    try:
        gs.check_embeddings(z)
    except ValueError as e:
        raise ValueError(f"embeddings of {what}: {e}") from None
    return z


class RetrievalRouter(_EmbeddingRouter, _WeightsRouter):
    """LoraRetriever (training-free form): top-k LoRAs by cosine(E(x), mean sample embedding)."""

    name = "retrieval"

    def __init__(self, pool, *, k: int = 3, combine: str = "mixture", embedder=None, **options):
        _EmbeddingRouter.__init__(self, pool, embedder=embedder, **options)
        if combine not in ("mixture", "fusion"):
            raise ValueError(f"combine must be 'mixture' or 'fusion', got {combine!r}")
        self.combine, self.k = combine, int(k)
        cents = np.stack([self.sample_embeddings[n].mean(0) for n in pool.names])
        self.centroids = cents / np.linalg.norm(cents, axis=1, keepdims=True).clip(1e-12)

    def route(self, texts, *, embeddings=None, active=None, **kw):
        act = self._active_for(active)
        z = self.embed(texts, embeddings)
        z = z / np.linalg.norm(z, axis=1, keepdims=True).clip(1e-12)
        sim = z @ self.centroids.T  # B A
        sim = np.where(act[None], sim, -np.inf)
        k = min(self.k, int(act.sum()))
        top = np.argsort(-sim, axis=1, kind="stable")[:, :k]
        w = np.zeros_like(sim, dtype=np.float32)
        np.put_along_axis(w, top, 1.0 / k, axis=1)
        return self._hook(w, {"similarity": sim})


class ArrowRouter(Router):
    """PEFT's Arrow: per-token top-k over |x . prototype|; optional GenKnowSub.

    The defaults reproduce PEFT's `create_arrow_model` with `ArrowConfig(top_k=3,
    router_temperature=1.0, rng_seed=0)`: prototypes by 15 float32 power iterations from
    `torch.randn(D)` seeded with `seed` (`arrow_prototypes`). `prototypes="svd"` uses the exact
    top singular vectors instead; `power_init` overrides the start vector.
    """

    name = "arrow"

    def __init__(self, pool, *, top_k: int = 3, temperature: float = 1.0,
                 general: Sequence[str] = (), prototypes: str = "power", power_iters: int = 15,
                 power_init: np.ndarray | None = None, seed: int = 0, **options):
        super().__init__(pool, **options)
        if prototypes not in ("power", "svd"):
            raise ValueError(f"router 'arrow': prototypes must be 'power' or 'svd', "
                             f"got {prototypes!r}")
        if int(top_k) < 1 or float(temperature) <= 0 or int(power_iters) < 1:
            raise ValueError(f"router 'arrow': need top_k >= 1, temperature > 0 and "
                             f"power_iters >= 1 (got {top_k}, {temperature}, {power_iters})")
        self.top_k, self.temperature = int(top_k), float(temperature)
        arrays = pool.arrays
        self._general = np.zeros(len(pool), bool)
        if general:
            self._general[[pool.index(n) for n in general]] = True
            arrays = genknowsub(arrays, self._general)
        init_key = None if power_init is None else hashlib.sha1(
            np.asarray(power_init, np.float32).tobytes()).hexdigest()
        key = ("arrow_protos", tuple(general), prototypes, int(power_iters), init_key, int(seed))
        protos = self.cache.get(key, lambda: {m: jnp.asarray(v) for m, v in arrow_prototypes(
            arrays, prototypes, iters=power_iters, init=power_init, seed=seed).items()},
            owner=pool.arrays.A)
        self.hook = ArrowHook(arrays, protos, top_k=self.top_k, temperature=self.temperature)

    def route(self, texts, *, active=None, **kw):
        # follow the active set (protocol views); general adapters never route
        active = jnp.asarray(self._active_for(active) & ~self._general)
        hook = self.hook.replace(arrays=self.hook.arrays.replace(active=active))
        return Routing(hook, {"router": self.name}, self.pool.names)


class RocFixedRouter(Router):
    name = "roc-fixed"

    def __init__(self, pool, *, budget: int = 24, **options):
        super().__init__(pool, **options)
        self.budget = int(budget)

    def route(self, texts, *, active=None, **kw):
        arrays = self.pool.arrays.replace(active=jnp.asarray(self._active_for(active)))
        return Routing(RocFixedHook(arrays, budget=self.budget),
                       {"router": self.name}, self.pool.names)


RULES = ("paper", "calibrated")
_RAW = dict(rule="paper", k=3, gamma=0.4, tau=1.0, mode="expected", kappa="sqrt", max_candidates=8,
            floor=-3.0, margin=3.0, full_at=0.0, allocation="relative")
PRESETS = {
    # the paper's rule on raw scores (method doc §2.3-2.5), deterministic allocation
    "raw": dict(_RAW),
    # the paper's rule with its sampled allocation
    "paper": dict(_RAW, mode="sample"),
    # calibrated scores, adaptive candidate set and capacity, no dilution (sequence.py rules 1'-3')
    "calibrated": dict(_RAW, rule="calibrated", kappa="sqrt-eff"),
}
PRESETS["default"] = dict(PRESETS["raw"])


class HiLoRARouter(_EmbeddingRouter):
    """HiLoRA (method doc §2-3): Gaussian sequence stage + token-level top-n ROCs.

    ``rule="paper"`` applies the paper's selection to raw scores ``s_i``; ``rule="calibrated"``
    applies ``sequence.calibrated_decisions`` to calibrated scores (``gaussian`` module docstring;
    thresholds ``floor``, ``margin``, ``full_at`` in calibrated units, ``tau`` too). Both record
    in ``info``: candidates, ROCs, budget, ``n_selected`` and ``cap_binds`` (the max_candidates cap
    removed candidates), ``coverage``, raw ``scores`` and, where the bank is calibrated (always
    for ``calibrated``; for ``paper`` when every adapter has >= 3 samples), ``cal_scores``.
    With ``estimator="pca"`` the basis is fitted on the active adapters only (one bank per
    active set, cached), so a protocol's held-out adapters do not shape it.
    ``pack_weights="int8"`` keeps the packed ROCs (``packed`` / ``auto``) in int8 with a float32
    scale per ROC (``routing.hooks.RocPack``).
    """

    name = "hilora"

    def __init__(self, pool, *, preset: str = "default", k: int | None = None,
                 gamma: float | None = None, tau: float | None = None,
                 max_candidates: int | None = None, mode: str | None = None,
                 kappa: str | None = None, rule: str | None = None, floor: float | None = None,
                 margin: float | None = None, full_at: float | None = None,
                 allocation: str | None = None, seed: int = 0, estimator: str = "ledoit_wolf",
                 strategy: str = "auto", min_budget: int = 1, pca_dim: int | None = None,
                 trim: bool = True, pack_weights: str | None = None, embedder=None, **options):
        super().__init__(pool, embedder=embedder, **options)
        if pack_weights in ("none", ""):
            pack_weights = None
        if pack_weights not in (None, *PACK_WEIGHTS):
            raise ValueError(f"pack_weights must be one of {PACK_WEIGHTS} or None, got "
                             f"{pack_weights!r}")
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
        p = dict(PRESETS[preset])
        for name, v in dict(k=k, gamma=gamma, tau=tau, max_candidates=max_candidates, mode=mode,
                            kappa=kappa, rule=rule, floor=floor, margin=margin, full_at=full_at,
                            allocation=allocation).items():
            if v is not None:
                p[name] = v
        if p["kappa"] not in KAPPA_MODES:
            raise ValueError(f"kappa must be one of {KAPPA_MODES}, got {p['kappa']!r}")
        if p["rule"] not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {p['rule']!r}")
        if p["allocation"] not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {p['allocation']!r}")
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        if estimator not in gs.ESTIMATORS:
            raise ValueError(f"estimator must be one of {gs.ESTIMATORS}, got {estimator!r}")
        if not 0 < float(p["gamma"]) <= 1:
            raise ValueError(f"gamma must be in (0, 1], got {p['gamma']}")
        if not float(p["floor"]) < float(p["full_at"]):
            raise ValueError(f"need floor < full_at, got floor={p['floor']}, full_at={p['full_at']}")
        if not float(p["margin"]) >= 0:
            raise ValueError(f"margin must be >= 0, got {p['margin']}")
        if int(min_budget) < 0:
            raise ValueError("min_budget must be >= 0")
        self.params = {**p, "k": int(p["k"]), "gamma": float(p["gamma"]), "tau": float(p["tau"]),
                       "max_candidates": int(p["max_candidates"]), "floor": float(p["floor"]),
                       "margin": float(p["margin"]), "full_at": float(p["full_at"])}
        self.preset, self.estimator, self.pca_dim = preset, estimator, pca_dim
        self.seed, self.strategy, self.min_budget = int(seed), strategy, int(min_budget)
        self.trim = bool(trim)
        self.pack_weights = pack_weights
        m_min = min(len(self.sample_embeddings[n]) for n in pool.names)
        # calibration is needed by the calibrated rule; for the paper rule it is a diagnostic
        self.calibrate = self.params["rule"] == "calibrated" or m_min >= 3
        self.bank = self._bank_for(self._active)
        self._decide = jax.jit(functools.partial(
            _decide, rule=self.params["rule"], k=self.params["k"], gamma=self.params["gamma"],
            max_candidates=self.params["max_candidates"], mode=self.params["mode"],
            kappa_mode=self.params["kappa"], min_budget=self.min_budget,
            floor=self.params["floor"], margin=self.params["margin"],
            full_at=self.params["full_at"], allocation=self.params["allocation"]))

    def _bank_for(self, active: np.ndarray) -> gs.GaussianBank:
        """The Gaussians for this active set (only ``pca`` depends on it: the basis)."""
        act = np.asarray(active, bool)
        sub = act.tobytes() if self.estimator == "pca" else None
        key = ("gaussians", _embedder_key(self.embedder), _samples_key(self.pool), self.estimator,
               self.pca_dim, self.calibrate, sub)
        return self.cache.get(key, lambda: gs.fit_gaussians(
            [self.sample_embeddings[n] for n in self.pool.names], self.estimator,
            pca_dim=self.pca_dim, names=self.pool.names, calibrate=self.calibrate,
            basis_from=act if self.estimator == "pca" else None))

    def route(self, texts, *, embeddings: np.ndarray | None = None, active=None,
              **kw) -> Routing:
        z = self.embed(texts, embeddings)
        keys = None  # one key per sequence, from its text: only sample mode draws
        if self.params["mode"] == "sample" and self.params["rule"] == "paper":
            keys = jnp.stack([jax.random.fold_in(jax.random.key(self.seed),
                                                 zlib.crc32(t.encode()) & 0x7FFFFFFF)
                              for t in texts])
        arr = self.pool.arrays
        bank = self.bank
        if active is not None:
            act = self._active_for(active)
            arr = arr.replace(active=jnp.asarray(act))
            bank = self._bank_for(act)
        dec, scores, cal, kap = self._decide(bank, jnp.asarray(z), arr.ranks, arr.active,
                                             jnp.float32(self.params["tau"]), keys)
        info = {k: np.asarray(v) for k, v in dataclasses.asdict(dec).items()}
        # only the slots that hold ROCs in this batch go to the token stage (exact: later slots
        # have n = 0); at most log2(max_candidates)+1 shape variants
        c = trim_slots(info["n_rocs"]) if self.trim else info["n_rocs"].shape[1]
        hook = HiLoRAHook(arr, dec.cand_idx[:, :c], dec.cand_valid[:, :c], dec.n_rocs[:, :c], kap,
                          strategy=self.strategy)
        if self.strategy in ("packed", "auto"):
            # the pool's packed ROCs (cached) + decisions folded per ROC
            hook = hook.prepared(pack_weights=self.pack_weights)
        info.update(router=self.name, scores=np.asarray(scores), kappa=np.asarray(kap),
                    rule=self.params["rule"])
        if cal is not None:
            info["cal_scores"] = np.asarray(cal)
        return Routing(hook, info, self.pool.names)


def _decide(bank, z, ranks, active, tau, keys, *, rule, k, gamma, max_candidates, mode,
            kappa_mode, min_budget, floor, margin, full_at, allocation):
    ll = gs.log_likelihood(bank, z)  # B A
    s = ll / bank.dim
    cal = None if bank.cal_loc is None else (ll - bank.cal_loc[None]) / bank.cal_scale[None]
    if rule == "calibrated":
        dec = calibrated_decisions(cal, ranks, active, floor=floor, margin=margin,
                                   full_at=full_at, tau=tau, max_candidates=max_candidates,
                                   allocation=allocation, gamma=gamma)
    else:
        dec = sequence_decisions(s, ranks, active, k=k, gamma=gamma, tau=tau,
                                 max_candidates=max_candidates, mode=mode, key=keys,
                                 min_budget=min_budget)
    return dec, s, cal, kappa(dec.n_rocs, kappa_mode)


ROUTERS = {r.name: r for r in (BaseRouter, OracleRouter, UniformRouter, RetrievalRouter,
                               ArrowRouter, RocFixedRouter, HiLoRARouter)}


def _coerce(v: str) -> Any:
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    return v  # note: "none" stays a string (it is a valid kappa mode)


def build_router(name: str, pool: LoraPool | str | None, *, options: dict | None = None,
                 model=None, engine=None, tokenizer=None, cache: RouterCache | None = None
                 ) -> Router:
    """Make a router by name. `options` values may be strings (from `--router-option k=v`).

    `embedder=llm` or `embedder=llm:<layer>` uses the base LLM's mean-pooled hidden states
    (needs `engine` and `tokenizer`). `cache`: a `RouterCache` shared with other routers over the
    same pool (sample embeddings, Gaussians and prototypes are then built once).
    """
    if name not in ROUTERS:
        raise ValueError(f"unknown router {name!r}; choose from {sorted(ROUTERS)}")
    opts = {k: (_coerce(v) if isinstance(v, str) else v) for k, v in (options or {}).items()}
    if isinstance(pool, (str, bytes)) or hasattr(pool, "__fspath__"):
        from hilora_jax.lora.io import load_pool

        pool = load_pool(pool, model=model)
    if isinstance(opts.get("general"), str):
        opts["general"] = tuple(s for s in opts["general"].split(",") if s)
    emb = opts.get("embedder")
    if isinstance(emb, str) and emb.startswith("llm"):
        if engine is None or tokenizer is None:
            raise ValueError("embedder=llm needs the base model's engine and tokenizer")
        from hilora_jax.embed.llm import LLMEmbedder

        layer = int(emb.split(":", 1)[1]) if ":" in emb else None
        opts["embedder"] = LLMEmbedder(engine, tokenizer, layer)
    return ROUTERS[name](pool, cache=cache, **opts)


def pool_fingerprint(pool: LoraPool) -> str:
    """Short content hash of a pool: its names and the *whole* content of every array.

    Each array is hashed with its pytree path, dtype and shape, in the pytree's fixed order, so
    one changed element anywhere (a retrained adapter), a changed active set or a reshaped pool
    gives a new fingerprint (caches keyed by it: eval resume, the benchmark's screen cache).
    """
    h = hashlib.sha1(json.dumps(list(pool.names)).encode())
    for path, leaf in jax.tree_util.tree_flatten_with_path(pool.arrays)[0]:
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"|{jax.tree_util.keystr(path)}|{a.dtype.str}|{a.shape}|".encode())
        h.update(memoryview(a.reshape(-1).view(np.uint8)))
    return h.hexdigest()[:12]
