"""Routing hooks: the per-module maths of every router, as pytrees the model calls.

Each hook is a `model.hook.LoraHook`: `delta(layer, name, x) -> (delta, trace) | None`, the trace
being this call's routing arrays. Hooks are `flax.struct` pytrees: pool arrays and per-sequence
decisions are leaves (new decisions never recompile), strategies and hyper-parameters are static
fields. Every hook reads a module's layer through `PoolArrays.layer` (active mask and masked scale
computed there, once).

Shape letters: the legend in `hilora_jax.model.projections` (D and E: a module's input and output
dims; P packed ROCs; K sparse-mixture slots).

* `HiLoRAHook`: method §3. For each candidate LoRA i of a sequence (from the sequence stage),
  `u_ij(t) = a_ij . x_t`; keep the n_i(module) largest |u| ROCs; delta =
  `kappa * sum_i s_i sum_{j kept} u_ij b_ij`. Strategies with identical outputs:
  `dense` (the reference path) computes u over the whole rank-padded pool `[B,T,A,R]` and masks
  (cost grows with A); `gathered` first gathers each sequence's candidates `[B,C,R,D]` (cost
  independent of A, but every row reads its own copy of C x R_max ROCs); `packed` computes u
  once for the batch against the pool's valid ROCs packed without rank padding and grouped by
  rank (`RocPack`, built on the host by `pack_rocs` / `HiLoRAHook.prepared`), selects per rank
  group and does one dense `[P, E]` matmul for the B side (cost grows with the pool's *valid*
  ROCs, independent of B x C); `auto` picks the cheapest of these per module call from static
  shapes (`token_cost`).
* `RocFixedHook`: token-level global top-`budget` ROCs over the whole pool (the "HiLoRA-ROC"
  baseline).
* `ArrowHook`: Arrow (Ostapenko et al. 2024) exactly as PEFT's `ArrowLoraLinearLayer`: per token,
  `|x . proto_a|` over the pool, top-k, softmax with temperature over the kept ones, weighted sum
  of the k adapters' full updates.
* `FusionHook`: parameter averaging ("fusion"): per sequence, `A_f = sum_i w_i A_i`,
  `B_f = sum_i w_i s_i B_i`, delta = `(x A_f^T) B_f`.
"""

# ruff: noqa: F722

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jaxtyping import Array, Bool, Float, Int

from hilora_jax.lora.pool import PoolArrays, masked_scale
from hilora_jax.model.hook import LoraHook
from hilora_jax.model.projections import shared_input_groups
from hilora_jax.routing.sequence import per_module_counts
from hilora_jax.routing.token import roc_fixed_gates, topn_gates

STRATEGIES = ("dense", "gathered", "packed", "auto")


# Modules the model calls with the same input `x` (attention: q, k, v; MLP: gate, up; from the
# projection table): `packed` computes their responses with one matmul against the concatenated packs.
SHARED_INPUT = shared_input_groups()


@struct.dataclass
class RocPack:
    """A pool's valid ROCs per module without rank padding, grouped by rank (`packed` strategy).

    Per module m (present in the pool), one array per layer (a list of L arrays: slicing a
    stacked `[L, ...]` array inside the decode loop copies it every step): `B[m][l] [P_m, E]`,
    `w[m][l] [P_m]` (s_ij where the ROC exists at that layer, else 0) and `valid[m][l] [P_m]`.
    The input side `A[key][l] [P_key, D]` is stored per *input* (`inputs`: `((key, ((m, offset, P_m), ...)), ...)`, static): modules
    that share their input (`SHARED_INPUT`) are concatenated along P, so their responses are one
    matmul. `groups` (static): `((m, ((r, adapters), ...)), ...)`; each group is a block of
    `len(adapters) * r` consecutive ROCs of m, adapter `adapters[k]`'s ROC j at
    `block_offset + k * r + j`, where r is the adapter's largest rank of m over layers (layers
    where it has fewer ROCs are masked by `valid`). Adapters that never adapt m are left out.
    Only `arrays.active` is read at run time, so one pack serves every protocol view of the pool.

    int8 pack (`pack_rocs(arrays, weights="int8")`): `A` and `B` hold int8 ROCs with a float32
    scale per ROC, `A_scale[key][l] [P_key]` and `B_scale[m][l] [P_m]` (symmetric, `max |row| /
    127`); the responses are `(x . q_a) * scale_a` and the B side takes `scale_b` into each ROC's
    coefficient, so the dequantised rows are never materialised and a decode step reads one byte
    per ROC weight. `None` (the default): the rows in the pool's dtype.
    """

    A: dict
    B: dict
    w: dict
    valid: dict
    groups: tuple = struct.field(pytree_node=False, default=())
    inputs: tuple = struct.field(pytree_node=False, default=())
    A_scale: dict | None = None
    B_scale: dict | None = None

    @property
    def weights(self) -> str | None:
        """`"int8"` for an int8 pack, else None (the pool's dtype)."""
        return None if self.A_scale is None else "int8"

    def module_groups(self, name: str) -> tuple:
        for m, g in self.groups:
            if m == name:
                return g
        raise KeyError(name)

    def module_input(self, name: str) -> tuple[str, tuple]:
        """`(key, ((m, offset, P_m), ...))` of the input that module `name` reads."""
        for key, members in self.inputs:
            if any(m == name for m, _, _ in members):
                return key, members
        raise KeyError(name)

    def module_A(self, name: str, layer: int) -> Array:
        """`[P_m, D]` input side of module `name` at `layer` (a slice of its input's pack)."""
        key, members = self.module_input(name)
        _, off, p = next(mm for mm in members if mm[0] == name)
        return self.A[key][layer][off:off + p]


PACK_WEIGHTS = ("int8",)  # pack formats besides the pool's dtype (None)


def quantize_rows(a: Array) -> tuple[Array, Array]:
    """Symmetric int8 per row of `a [..., P, D]`: `(q int8 [..., P, D], scale float32 [..., P])`
    with `scale = max |row| / 127` (1 for an all-zero row), `q = round(a / scale)`; each entry is
    reconstructed within `scale / 2`."""
    a32 = jnp.asarray(a, jnp.float32)
    amax = jnp.max(jnp.abs(a32), axis=-1)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    q = jnp.clip(jnp.round(a32 / scale[..., None]), -127, 127).astype(jnp.int8)
    return q, scale


def input_layout(rocs: dict[str, int], modules) -> tuple:
    """`RocPack.inputs` for modules with `rocs[m]` packed ROCs: per input, in `modules` order,
    `(key, ((m, offset, P_m), ...))`, the modules of one `SHARED_INPUT` group that the pool
    adapts concatenated along P (the first of them is the key)."""
    inputs, done = [], set()
    for m in modules:
        if m in done or m not in rocs:
            continue
        members = [mm for mm in next((g for g in SHARED_INPUT if m in g), (m,)) if mm in rocs]
        offs, off = [], 0
        for mm in members:
            offs.append((mm, off, rocs[mm]))
            off += rocs[mm]
        inputs.append((m, tuple(offs)))
        done.update(members)
    return tuple(inputs)


_PACK_CACHE: dict = {}


def pack_rocs(arrays: PoolArrays, weights: str | None = None) -> RocPack:
    """Build (on the host, from concrete pool arrays) the `RocPack` of `arrays`; `weights="int8"`:
    its ROCs in int8 with a scale per ROC (`RocPack`).

    Cached per pool and format (the same A/B/scale/mask array objects give the same pack), so
    routing many batches packs once; the packed arrays are gathered on the pool's devices.
    """
    if weights not in (None, *PACK_WEIGHTS):
        raise ValueError(f"pack weights {weights!r}: unknown; choose from {PACK_WEIGHTS} or None")
    leaves = [d[m] for d in (arrays.A, arrays.B, arrays.scale, arrays.mask) for m in sorted(d)]
    if any(isinstance(v, jax.core.Tracer) for v in leaves):
        raise ValueError("pack_rocs needs concrete pool arrays (call it outside jax.jit, e.g. "
                         "HiLoRAHook.prepared() on the host)")
    key = (weights, *(id(v) for v in leaves))
    hit = _PACK_CACHE.get(key)
    if hit is not None and all(a is b for a, b in zip(hit[0], leaves, strict=True)):
        return hit[1]
    A_m, B, W, V, groups = {}, {}, {}, {}, []
    for m in arrays.modules:
        mask = np.asarray(arrays.mask[m])  # L A R
        mr = mask.sum(-1).max(0)  # A: largest module rank over layers
        grp, ai, ji = [], [], []
        for r in sorted({int(v) for v in mr if v > 0}):
            ads = tuple(int(a) for a in np.flatnonzero(mr == r))
            grp.append((r, ads))
            ai += [a for a in ads for _ in range(r)]
            ji += [j for _ in ads for j in range(r)]
        ai, ji = np.asarray(ai, np.int32), np.asarray(ji, np.int32)
        n_layers = mask.shape[0]
        A_m[m] = jnp.asarray(arrays.A[m])[:, ai, ji]  # L P D
        b_m = jnp.asarray(arrays.B[m])[:, ai, ji]  # L P E
        B[m] = [b_m[li] for li in range(n_layers)]
        w_m = np.asarray(masked_scale(mask, np.asarray(arrays.scale[m], np.float32)))[:, ai, ji]  # L P
        W[m] = [jnp.asarray(w_m[li]) for li in range(n_layers)]
        V[m] = [jnp.asarray(mask[li, ai, ji]) for li in range(n_layers)]
        groups.append((m, tuple(grp)))
    A, inputs = {}, input_layout({m: int(a.shape[1]) for m, a in A_m.items()}, arrays.modules)
    for first, members in inputs:
        a_cat = (jnp.concatenate([A_m[mm] for mm, _, _ in members], axis=1) if len(members) > 1
                 else A_m[first])  # L P_key D
        A[first] = [a_cat[li] for li in range(a_cat.shape[0])]
    a_scale = b_scale = None
    if weights == "int8":
        A, a_scale = _quantize_layers(A)
        B, b_scale = _quantize_layers(B)
    pack = RocPack(A=A, B=B, w=W, valid=V, groups=tuple(groups), inputs=inputs,
                   A_scale=a_scale, B_scale=b_scale)
    if len(_PACK_CACHE) >= 4:
        _PACK_CACHE.pop(next(iter(_PACK_CACHE)))
    _PACK_CACHE[key] = (leaves, pack)
    return pack


def _quantize_layers(rows: dict) -> tuple[dict, dict]:
    q, sc = {}, {}
    for k, layers in rows.items():
        pairs = [quantize_rows(a) for a in layers]
        # keep each array's sharding (a replicated pack stays replicated, a sharded one sharded)
        q[k] = [jax.device_put(qa, a.sharding) for (qa, _), a in zip(pairs, layers, strict=True)]
        sc[k] = [s for _, s in pairs]
    return q, sc


@jax.jit
def _packed_args(hook: HiLoRAHook) -> dict:
    return hook._packed_inputs()


# Relative cost of reading one weight float vs one multiply-add in `token_cost` (CPU decode is
# bound by weight reads and copies; prefill by multiply-adds), and the cost of a multiply-add in
# `gathered`'s per-row batched matmuls relative to a plain matmul (XLA:CPU runs them ~3x slower
# per multiply-add; accelerators batch them at full speed). Calibrated with
# benchmarks/token_stage.py (profile section).
READ_COST = 8.0
BATCHED_MATMUL_COST = {"cpu": 3.0}


def token_cost(strategy: str, *, b: int, t: int, c: int, a: int, r: int, p: int,
               d: int, e: int, backend: str | None = None, pack_read: float = 1.0) -> float:
    """Static cost model of one HiLoRA module call (multiply-adds + READ_COST x weights read).

    b batch, t tokens, c candidate slots, a pool adapters, r padded rank, p packed ROCs, d/e the
    module's in/out dims, backend (default `jax.default_backend()`). `gathered` reads B x C x R
    ROC rows (one copy per row, gathered then read) in per-row batched matmuls, `dense` A x R
    rows once, `packed` P rows once (`pack_read`: bytes per pack weight relative to the pool's,
    0.5 for an int8 pack of a bf16 pool).
    """
    backend = jax.default_backend() if backend is None else backend
    rows = {"gathered": c * r, "dense": a * r, "packed": p}[strategy]
    reads = {"gathered": 2 * b * c * r, "dense": a * r, "packed": p * pack_read}[strategy]
    flop = BATCHED_MATMUL_COST.get(backend, 1.0) if strategy == "gathered" else 1.0
    return float(flop * b * t * rows * (d + e) + READ_COST * reads * (d + e))


@struct.dataclass
class HiLoRAHook(LoraHook):
    """HiLoRA token stage over a batch's sequence decisions (module docstring: strategies).

    `pack` is needed by `packed` (and lets `auto` choose it): build it with `prepared()` on the
    host. Valid candidate slots of a row must hold distinct adapters (as `sequence_decisions`
    gives them).
    """

    arrays: PoolArrays
    cand_idx: Int[Array, "B C"]
    cand_valid: Bool[Array, "B C"]
    n_rocs: Int[Array, "B C"]  # adapter-level allotment n_i (sequence stage)
    kappa: Float[Array, " B"]
    pack: RocPack | None = None
    # per module: (n [L x [B, K]] per packed adapter, valid [L x [P]], kappa * s * valid
    # [L x [B, P]]), derived from the decisions by `prepared()` so the decode loop only runs
    # the responses, the selection and the B side
    packed_args: dict | None = None
    strategy: str = struct.field(pytree_node=False, default="gathered")
    topn_method: str = struct.field(pytree_node=False, default="pairwise")
    # the backend `auto` chooses for (default: `jax.default_backend()`; `hilora aot` sets the
    # compile target's, e.g. "tpu" on a CPU host)
    backend: str | None = struct.field(pytree_node=False, default=None)

    def prepared(self, strategy: str | None = None, pack_weights: str | None = None) -> HiLoRAHook:
        """This hook with its pool's `RocPack` attached (host side; cached per pool) and,
        optionally, another strategy. `packed` and `auto` use the pack; the others ignore it.
        `pack_weights="int8"`: an int8 pack (`RocPack`); an attached pack is kept as it is."""
        strategy = self.strategy if strategy is None else strategy
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; choose from {STRATEGIES}")
        pack = self.pack if self.pack is not None else pack_rocs(self.arrays, pack_weights)
        h = self.replace(pack=pack, strategy=strategy, packed_args=None)
        if strategy not in ("packed", "auto"):
            return h
        return h.replace(packed_args=_packed_args(h))

    def _packed_inputs(self) -> dict:
        """`packed_args` (see the field), traced once per decision shapes by `prepared()`."""
        pk = self.pack
        idx, cv = self.cand_idx, self.cand_valid
        num_a = self.arrays.num_adapters
        slot_of = (idx[..., None] == jnp.arange(num_a)) & cv[..., None]  # B C A
        out = {}
        for m, groups in pk.groups:
            order = np.asarray([a for _, ads in groups for a in ads], np.int32)  # K
            owner = np.asarray([a for r, ads in groups for a in ads for _ in range(r)], np.int32)
            act_p = self.arrays.active[owner]  # P
            n_l, v_l, w_l = [], [], []
            for layer in range(len(pk.valid[m])):
                mask_l = self.arrays.mask[m][layer] & self.arrays.active[:, None]
                n_mod = self._n_module(mask_l)  # B C
                # adapter-level counts [B, A] (valid slots hold distinct adapters)
                n_ad = jnp.sum(jnp.where(slot_of, n_mod[..., None], 0), axis=1)
                n_l.append(n_ad[:, order])  # B K
                v = pk.valid[m][layer] & act_p
                v_l.append(v)
                w_l.append(jnp.where(v, pk.w[m][layer], 0.0)[None] * self.kappa[:, None])  # B P
            out[m] = (n_l, v_l, w_l)
        return out

    def choose(self, name: str, x_shape) -> str:
        """The strategy used for module `name` with input shape `x_shape` (static)."""
        if self.strategy != "auto":
            return self.strategy
        b, t, d = x_shape
        a, r, e = (self.arrays.A[name].shape[1], self.arrays.A[name].shape[2],
                   self.arrays.B[name].shape[-1])
        c = self.cand_idx.shape[1]
        p = self.pack.B[name][0].shape[0] if self.pack is not None else None
        options = ("dense", "gathered") + (("packed",) if p is not None else ())
        pack_read = 1.0
        if self.pack is not None and self.pack.weights == "int8":
            pack_read = 1.0 / jnp.dtype(self.arrays.A[name].dtype).itemsize
        costs = {s: token_cost(s, b=b, t=t, c=c, a=a, r=r, p=p or 0, d=d, e=e,
                               backend=self.backend, pack_read=pack_read) for s in options}
        return min(options, key=lambda s: (costs[s], s != "packed"))

    def deltas(self, layer: int, names, x: Float[Array, "B T D"]):
        """`delta` of each of `names` (all reading `x`); the `packed` ones share one matmul of `x`
        against their input's concatenated packs (q/k/v; gate/up)."""
        shared: dict = {}  # pack input key -> responses u [B, T, P_key], computed once
        return tuple(self._delta(layer, n, x, shared) for n in names)

    def delta(self, layer: int, name: str, x: Float[Array, "B T D"]):
        return self._delta(layer, name, x, {})

    def _delta(self, layer: int, name: str, x, shared: dict):
        if name not in self.arrays.A:
            return None
        strategy = self.choose(name, x.shape)
        if strategy not in STRATEGIES[:3]:
            raise ValueError(f"unknown strategy {self.strategy!r}; choose from {STRATEGIES}")
        if strategy == "packed":
            return self._packed(layer, name, x, shared)
        A_l, B_l, mask_l, w_l = self.arrays.layer(name, layer)
        idx = self.cand_idx
        n_mod = self._n_module(mask_l)
        valid_c = mask_l[idx] & self.cand_valid[..., None]  # B C R
        if strategy == "gathered":
            A_c, B_c = self.arrays.rows(name, layer, idx, tokens=x.shape[1])  # B C R D/E
            u = jnp.einsum("BTD,BCRD->BTCR", x, A_c.astype(x.dtype))
            g = topn_gates(u, n_mod, valid_c, method=self.topn_method)  # B T C R
            coef = u * g * (w_l[idx] * valid_c).astype(u.dtype)[:, None]  # B T C R
            delta = jnp.einsum("BTCR,BCRE->BTE", coef, B_c.astype(x.dtype))
        else:  # dense
            u_all = jnp.einsum("BTD,ARD->BTAR", x, A_l.astype(x.dtype))  # B T A R
            u = jnp.take_along_axis(u_all, idx[:, None, :, None], axis=2)  # B T C R
            g = topn_gates(u, n_mod, valid_c, method=self.topn_method)  # B T C R
            onehot = jax.nn.one_hot(idx, A_l.shape[0], dtype=u.dtype) * self.cand_valid[..., None]
            g_all = jnp.einsum("BTCR,BCA->BTAR", g, onehot)  # B T A R
            delta = jnp.einsum("BTAR,ARE->BTE", u_all * g_all * w_l.astype(u.dtype),
                               B_l.astype(x.dtype))
        delta = delta * self.kappa[:, None, None].astype(delta.dtype)
        # B T C: ROCs fired per candidate and token
        return delta, {"fired": g.sum(-1).astype(jnp.int8), "n_module": n_mod}

    def _n_module(self, mask_l):
        """Per-module ROC counts `[B, C]` of the candidates (sequence stage's n_i rescaled)."""
        idx = self.cand_idx
        module_rank = jnp.where(self.cand_valid, mask_l.sum(-1)[idx], 0).astype(jnp.int32)  # B C
        return per_module_counts(self.n_rocs, self.arrays.ranks[idx], module_rank)

    def _packed(self, layer: int, name: str, x, shared: dict):
        """u against the packed ROCs (one matmul per input: `shared` holds the responses of this
        `x` against its input's concatenated packs, so q, k, v (gate, up) asked together in
        `deltas` share it); top-n per rank group; one `[B, T, P] x [P, E]` matmul.
        Non-candidate adapters get n = 0 (no ROC fires)."""
        if self.pack is None:
            raise ValueError("strategy 'packed' needs the pool's RocPack: use hook.prepared() on "
                             "the host before jit")
        pk = self.pack
        key, members = pk.module_input(name)
        if key not in shared:
            u = jnp.einsum("BTD,PD->BTP", x, pk.A[key][layer].astype(x.dtype))  # B T P_key
            if pk.A_scale is not None:
                u = u * pk.A_scale[key][layer].astype(x.dtype)
            shared[key] = u
        _, off, p = next(mm for mm in members if mm[0] == name)
        return self._packed_module(layer, name, shared[key][..., off:off + p], x.dtype)

    def _packed_module(self, layer: int, name: str, u, dtype):
        pk = self.pack
        groups = pk.module_groups(name)
        b, t, _ = u.shape
        num_a = self.arrays.num_adapters
        idx, cv = self.cand_idx, self.cand_valid
        n_mod = self._n_module(self.arrays.mask[name][layer] & self.arrays.active[:, None])
        args = self.packed_args if self.packed_args is not None else self._packed_inputs()
        n_l, v_l, w_l = (z[layer] for z in args[name])  # B K, P, B P (kappa * s * valid)
        coefs, fired_g, order = [], [], []
        off = koff = 0
        for r, ads in groups:
            k = len(ads)
            sl = slice(off, off + k * r)
            ug = u[..., sl].reshape(b, t, k, r)
            vg = v_l[sl].reshape(k, r)
            gg = topn_gates(ug, n_l[:, koff:koff + k], jnp.broadcast_to(vg, (b, k, r)),
                            method=self.topn_method)  # B T k r
            wg = w_l[:, sl].reshape(b, 1, k, r).astype(u.dtype)
            coefs.append((ug * gg * wg).reshape(b, t, k * r))
            fired_g.append(gg.sum(-1))  # B T k
            order += list(ads)
            off += k * r
            koff += k
        if coefs:
            coef = jnp.concatenate(coefs, -1) if len(coefs) > 1 else coefs[0]
            if pk.B_scale is not None:
                coef = coef * pk.B_scale[name][layer].astype(coef.dtype)
            delta = jnp.einsum("BTP,PE->BTE", coef, pk.B[name][layer].astype(dtype))
            fired_ad = jnp.zeros((b, t, num_a), u.dtype).at[..., np.asarray(order)].set(
                jnp.concatenate(fired_g, -1))
            fired = jnp.take_along_axis(fired_ad, idx[:, None, :], axis=2) * cv[:, None]
        else:  # no adapter of the pool adapts this module
            delta = jnp.zeros((b, t, pk.B[name][layer].shape[-1]), dtype)
            fired = jnp.zeros((b, t, idx.shape[1]), dtype)
        return delta, {"fired": fired.astype(jnp.int8), "n_module": n_mod}


@struct.dataclass
class RocFixedHook(LoraHook):
    arrays: PoolArrays
    budget: int = struct.field(pytree_node=False, default=24)

    def delta(self, layer, name, x):
        if name not in self.arrays.A:
            return None
        A_l, B_l, mask_l, w_l = self.arrays.layer(name, layer)
        u = jnp.einsum("BTD,ARD->BTAR", x, A_l.astype(x.dtype))
        budget = min(self.budget, int(np.prod(mask_l.shape)))
        g = roc_fixed_gates(u, mask_l, budget=budget)
        delta = jnp.einsum("BTAR,ARE->BTE", u * g * w_l.astype(u.dtype), B_l.astype(x.dtype))
        return delta, {"fired": g.sum(-1).astype(jnp.int8)}  # B T A


@struct.dataclass
class ArrowHook(LoraHook):
    arrays: PoolArrays
    protos: dict  # module -> [L, A, D] unit prototypes
    top_k: int = struct.field(pytree_node=False, default=3)
    temperature: float = struct.field(pytree_node=False, default=1.0)

    def delta(self, layer, name, x):
        if name not in self.arrays.A:
            return None
        A_l, B_l, mask_l, w_l = self.arrays.layer(name, layer)
        proto = self.protos[name][layer].astype(x.dtype)  # A D
        present = mask_l.any(-1)  # A: adapter has this module at this layer and is active
        sim = jnp.abs(jnp.einsum("BTD,AD->BTA", x, proto))
        sim = jnp.where(present, sim, -jnp.inf)
        k = min(self.top_k, proto.shape[0])
        top_v, top_i = jax.lax.top_k(sim, k)  # B T k
        logits = jnp.full(sim.shape, -jnp.inf, sim.dtype)
        logits = jnp.put_along_axis(logits, top_i, top_v, axis=-1, inplace=False)
        coeff = jax.nn.softmax(logits / self.temperature, axis=-1)  # B T A
        coeff = jnp.where(jnp.isfinite(logits), coeff, 0.0)
        u = jnp.einsum("BTD,ARD->BTAR", x, A_l.astype(x.dtype))
        delta = jnp.einsum("BTAR,ARE->BTE", u * coeff[..., None] * w_l.astype(u.dtype),
                           B_l.astype(x.dtype))
        return delta, {"coeff": coeff}


def trim_slots(n: np.ndarray) -> int:
    """Candidate slots actually needed by a batch: the last slot with ROCs, rounded up to a
    power of two (so a batch compiles one of at most log2(C)+1 variants)."""
    used = np.asarray(n) > 0
    last = int(np.max(np.where(used.any(0), np.arange(used.shape[1]) + 1, 0))) if used.size else 0
    k = 1
    while k < last:
        k *= 2
    return min(max(k, 1), used.shape[1])


@struct.dataclass
class FusionHook(LoraHook):
    arrays: PoolArrays
    weights: Float[Array, "B A"]

    def delta(self, layer, name, x):
        if name not in self.arrays.A:
            return None
        A_l, B_l, mask_l, w_l = self.arrays.layer(name, layer)
        wts = self.weights.astype(x.dtype)
        m = mask_l.astype(x.dtype)
        A_f = jnp.einsum("BA,AR,ARD->BRD", wts, m, A_l.astype(x.dtype))
        B_f = jnp.einsum("BA,AR,ARE->BRE", wts, w_l.astype(x.dtype), B_l.astype(x.dtype))
        delta = jnp.einsum("BTR,BRE->BTE", jnp.einsum("BTD,BRD->BTR", x, A_f), B_f)
        return delta, {}


def arrow_prototypes(arrays: PoolArrays, method: str = "power", *, iters: int = 15,
                     init: np.ndarray | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Arrow prototypes: top right singular vector of `dW = B A` per module, layer and adapter,
    `{m: [L, A, D]}` (in the dtype of the pool's A, as PEFT stores them).

    `method="power"` (default) is PEFT 0.21's `ArrowLoraLinearLayer.build_prototypes` as
    `create_arrow_model(..., ArrowConfig(rng_seed=seed))` runs it: on the unscaled A and B (after
    GenKnowSub when used), `iters` (PEFT: 15) float32 power iterations `v -> A^T (B^T B) (A v)`,
    each normalised as `w / (|w| + 1e-8)`, from the start vector `v0 / (|v0| + 1e-8)` with
    `v0 = torch.randn(D, generator=torch.Generator().manual_seed(seed))`. PEFT seeds a fresh
    generator for every adapter and module, so all adapters of a module start from the same `v0`;
    `torch_randn` draws it in NumPy (torch's MT19937 stream and Box-Muller transform; equal to
    torch to 1 float32 ulp). `init [D]` overrides the start vector. PEFT's own default
    `rng_seed=None` draws from torch's global RNG and is not reproducible; `seed=0` reproduces
    `rng_seed=0`.
    `method="svd"` computes the exact top singular vector in float64 from the small `r x r`
    problem: with `A^T = Q R_a`, `dW^T dW = Q (R_a^T (B^T B) R_a) Q^T`, so the top eigenvector e
    of the `r x r` matrix gives `v = Q e` (equal to "power" where PEFT's 15 iterations converged).
    Arrow's logits use `|x . v|`, so signs never matter. Adapters absent from a module/layer get
    a zero prototype.
    """
    if method not in ("svd", "power"):
        raise ValueError(f"prototype method must be 'svd' or 'power', got {method!r}")
    out = {}
    eps = np.float32(1e-8)
    for m in arrays.modules:
        mask = np.asarray(arrays.mask[m])  # L A R
        L, N, _, D = arrays.A[m].shape
        if method == "power":
            v0 = (np.asarray(init, np.float32) if init is not None else torch_randn(D, seed))
            if v0.shape != (D,):
                raise ValueError(f"power-iteration init must have shape ({D},) for {m}")
            # padded ROCs are zeroed, so they add exact zeros to every sum below
            a = np.asarray(arrays.A[m], np.float32) * mask[..., None]  # L A R D
            b = np.asarray(arrays.B[m], np.float32) * mask[..., None]  # L A R E
            c = np.einsum("lnre,lnse->lnrs", b, b)  # B^T B in PEFT's [out, r] layout
            v = np.broadcast_to(v0 / (np.linalg.norm(v0) + eps), (L, N, D))
            for _ in range(iters):
                w = np.einsum("lnrd,lnr->lnd", a, np.einsum(
                    "lnrs,lns->lnr", c, np.einsum("lnrd,lnd->lnr", a, v)))
                v = w / (np.linalg.norm(w, axis=-1, keepdims=True) + eps)
            protos = np.where(mask.any(-1)[..., None], v, 0).astype(np.float32)
        else:
            A = np.asarray(arrays.A[m], np.float64)  # L A R D
            B = np.asarray(arrays.B[m], np.float64)  # L A R E
            protos = np.zeros((L, N, D), np.float32)
            for li in range(L):
                for i in range(N):
                    r = int(mask[li, i].sum())
                    if r == 0:
                        continue
                    a, b = A[li, i, :r], B[li, i, :r]  # [r, D], [r, E] (rows b_ij)
                    q, ra = np.linalg.qr(a.T)  # D r, r r
                    small = ra @ (b @ b.T) @ ra.T  # b @ b.T = B^T B in PEFT's layout
                    _, evecs = np.linalg.eigh((small + small.T) / 2)
                    v = q @ evecs[:, -1]
                    protos[li, i] = v / (np.linalg.norm(v) + 1e-12)
        out[m] = protos.astype(arrays.A[m].dtype)
    return out


def torch_randn(n: int, seed: int) -> np.ndarray:
    """`torch.randn(n, generator=torch.Generator().manual_seed(seed))` on CPU, in NumPy.

    torch's CPU generator is MT19937 seeded like NumPy's legacy `RandomState(seed)` (same uint32
    stream). For `n >= 16` torch fills `n` uniforms `(u32 & (2^24-1)) / 2^24` (plus 16 more that
    redo the last 16 values when `16 ∤ n`) and applies Box-Muller to blocks of 16 (first 8 are
    `u1`, last 8 `u2`: `r = sqrt(-2 log(1 - u1))`, outputs `r cos(2 pi u2)`, `r sin(2 pi u2)`) in
    float32 (torch's SIMD log/sin/cos may differ by 1 ulp). For `n < 16` it draws doubles (two
    uint32 each, 53 bits) and uses the cached polar pair `r cos`, `r sin` with
    `r = sqrt(-2 log1p(-u2))`, `theta = 2 pi u1`.
    """
    rs = np.random.RandomState(int(seed))
    if n >= 16:
        u = (rs.randint(0, 2**32, size=n + (16 if n % 16 else 0), dtype=np.uint32)
             & 0xFFFFFF).astype(np.float32) * np.float32(2.0**-24)
        data = u[:n].copy()

        def box_muller(blocks):  # [k, 16] -> [k, 16]
            r = np.sqrt(np.float32(-2) * np.log(np.float32(1) - blocks[:, :8]))
            theta = np.float32(2.0 * np.pi) * blocks[:, 8:]
            return np.concatenate([r * np.cos(theta), r * np.sin(theta)], axis=1)

        full = n - n % 16
        data[:full] = box_muller(data[:full].reshape(-1, 16)).reshape(-1)
        if n % 16:
            data[n - 16:] = box_muller(u[n:].reshape(1, 16))[0]
        return data.astype(np.float32)
    raw = rs.randint(0, 2**32, size=4 * ((n + 1) // 2), dtype=np.uint32).astype(np.uint64)
    pairs = ((raw[0::2] << np.uint64(32)) | raw[1::2]) & np.uint64(2**53 - 1)
    uni = pairs.astype(np.float64) * 2.0**-53  # u1, u2, u1, u2, ...
    r = np.sqrt(-2.0 * np.log1p(-uni[1::2]))
    theta = 2.0 * np.pi * uni[0::2]
    return np.stack([r * np.cos(theta), r * np.sin(theta)], axis=1).reshape(-1)[:n].astype(np.float32)


def genknowsub(arrays: PoolArrays, general: np.ndarray) -> PoolArrays:
    """GenKnowSub (PEFT `use_gks`): subtract the mean A and mean B of the `general` adapters from
    every other adapter's A and B; general adapters are deactivated. Needs equal ranks."""
    general = np.asarray(general, bool)
    if not general.any():
        raise ValueError("GenKnowSub needs at least one general adapter")
    A, B = {}, {}
    for m in arrays.modules:
        a, b, mk = np.asarray(arrays.A[m]), np.asarray(arrays.B[m]), np.asarray(arrays.mask[m])
        if not (mk == mk[:, :1]).all():
            raise ValueError(f"GenKnowSub needs every adapter to have the same rank in {m}")
        A[m] = jnp.asarray(a - np.where(~general[None, :, None, None], a[:, general].mean(1, keepdims=True), 0))
        B[m] = jnp.asarray(b - np.where(~general[None, :, None, None], b[:, general].mean(1, keepdims=True), 0))
    return arrays.replace(A=A, B=B, active=jnp.asarray(np.asarray(arrays.active) & ~general))
