# ruff: noqa: F722  (jaxtyping shape strings are not forward references)
"""The LoRA pool: N adapters stacked per target module as rank-one components (ROCs).

Shape letters and the LoRA layout: the legend in `hilora_jax.model.projections` (here D and E are a
module's input and output dims; A is the pool's N).

For each target module name `m` (`q_proj`, ..., `down_proj`) the pool holds

* `A[m]     [L, A, R, D]`: row j of adapter i's `lora_A` at layer l (ROC input vector `a_ij`);
* `B[m]     [L, A, R, E]`: *column* j of PEFT's `lora_B` stored as a row (ROC output `b_ij`);
* `scale[m] [L, A, R]`:    s_i for that module and layer (alpha/r, alpha/sqrt(r), or the patterns);
* `mask[m]  [L, A, R]`:    which ROCs exist.

R is the max rank over adapters and layers for that module. Missing pieces (a lower rank, an
untargeted module, an untransformed layer) are masked-out ROCs with zero weights and zero scale:
they are never read as weights, because every consumer multiplies by `mask`. Valid ROCs of an adapter
are always the prefix `j < rank`. `ranks [A]` is each adapter's nominal `r`, `module_rank[m] [L, A]`
the number of valid ROCs. `active [A]` marks the adapters in use (see `LoraPool.subset`).

Arrays live in `PoolArrays`, a pytree that goes into `jax.jit`; host metadata (names, clusters,
samples, sources, configs) stays in `LoraPool`. With a mesh, A follows its base kernel's input-side
sharding and B its output side (`sharding.lora_axes`); adapter and ROC axes are replicated.

The delta of one module is `sum_ij g_ij m_ij s_ij (a_ij . x) b_ij`, with gates `g` from a router.
One-hot gates over an adapter's ROCs give exactly that adapter's LoRA; all-ones gates the sum.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding
from jaxtyping import Array, Bool, Float, Int

from hilora_jax.io.peft import PeftAdapter
from hilora_jax.model import sharding as shd
from hilora_jax.model.config import ModelConfig
from hilora_jax.model.hook import LoraHook
from hilora_jax.model.projections import family_table, pool_module_order, projection


@struct.dataclass
class PoolArrays:
    """Device arrays of a pool (a pytree; dict keys are module names)."""

    A: dict  # m -> [L, A, R, D]
    B: dict  # m -> [L, A, R, E]
    scale: dict  # m -> [L, A, R]
    mask: dict  # m -> [L, A, R] bool
    ranks: Int[Array, " A"]  # nominal r_i
    active: Bool[Array, " A"]  # adapters in use (subset views)

    @property
    def modules(self) -> tuple[str, ...]:
        """Pool keys in projection-table order (Llama `q_proj`..., T5 rows `encoder.SelfAttention.q`...)."""
        return pool_module_order(self.A)

    @property
    def max_rank(self) -> int:
        """R_max over modules: the ROC axis length of pool-wide gates."""
        return max(v.shape[2] for v in self.A.values())

    @property
    def num_adapters(self) -> int:
        return int(self.ranks.shape[0])

    def module_rank(self, m: str) -> Int[Array, "L A"]:
        """Valid ROCs per layer and adapter for module `m`."""
        return self.mask[m].sum(-1).astype(jnp.int32)

    def layer(self, m: str, layer: int):
        """Module `m` at `layer` as every hook reads it: `(A_l [A, R, D], B_l [A, R, E],
        mask_l [A, R], w_l [A, R])`, the mask restricted to active adapters and `w_l` the masked
        scale (s_ij on valid ROCs, 0 elsewhere)."""
        mask_l = self.mask[m][layer] & self.active[:, None]
        return self.A[m][layer], self.B[m][layer], mask_l, masked_scale(mask_l, self.scale[m][layer])

    def rows(self, m: str, layer: int, idx, *, tokens: int = 1) -> tuple[Array, Array]:
        """`(A [*idx.shape, R, D], B [*idx.shape, R, E])`: the adapters `idx` of module `m` at
        `layer`, for an input of `tokens` tokens per row.

        For one token (a decode step) each side is one gather from the stacked `[L, A, R, .]`
        arrays: slicing the layer first makes XLA copy every adapter's rows of that layer in each
        step (Llama-2-7B + 50 r=8 LoRAs, v5e-8, batch 1: decode HBM bytes 1.35x -> 1.10x base).
        For a prompt, the layer is sliced first: there XLA:TPU handles the one-gather form by
        reading the whole stacked pool per module (prefill HBM 2.9 GB -> 16.7 GB in that setting;
        `benchmarks/results/aot.md`)."""
        if tokens == 1:
            return self.A[m][layer, idx], self.B[m][layer, idx]
        return self.A[m][layer][idx], self.B[m][layer][idx]

def masked_scale(mask, scale):
    """s_ij where the ROC exists (`mask`), 0 elsewhere: the one place padded ROCs are zeroed."""
    return jnp.where(mask, scale, 0)


def lora_delta(
    A_l: Float[Array, "A R D"],
    B_l: Float[Array, "A R E"],
    scale_l: Float[Array, "A R"],
    mask_l: Bool[Array, "A R"],
    x: Float[Array, "B T D"],
    gates: Float[Array, "B T A R"] | Float[Array, "B A R"],
) -> Float[Array, "B T E"]:
    """Gated low-rank delta of one module at one layer: `sum_ij g_ij m_ij s_ij (a_ij . x) b_ij`.

    `gates` per token `[B, T, A, R]`, or per sequence `[B, A, R]` (broadcast over tokens).
    Computed in `x`'s dtype promoted with the pool's.
    """
    u = jnp.einsum("BTD,ARD->BTAR", x, A_l)  # ROC responses a_ij . x_t
    w = masked_scale(mask_l, scale_l).astype(u.dtype)  # A R
    if gates.ndim == 3:
        gates = gates[:, None]  # B 1 A R
    return jnp.einsum("BTAR,ARE->BTE", u * w * gates.astype(u.dtype), B_l)


@struct.dataclass
class GatedHook(LoraHook):
    """Model hook (`model.hook.LoraHook`) applying the pool with given gates.

    Dense (`idx=None`): `gates` per sequence `[B, A, R]`, per token `[B, T, A, R]`, or per adapter
    `[B, A]` (broadcast to that adapter's ROCs). ROC gates may use each module's R or the pool-wide
    `arrays.max_rank` (each module then reads the first R_m entries: ROC j is the same index in
    every module); the cost grows with the pool size A.

    Sparse (`idx [B, K]` adapter indices): `gates [B, K]` weigh the K adapters gathered per row
    (0 for unused slots), `sum_k g_k s_k B_k A_k x`: equal to the dense hook with those weights
    scattered into `[B, A]`, at a cost independent of A (the oracle and retrieval routers).
    Inactive adapters (`arrays.active`) contribute nothing either way.
    """

    arrays: PoolArrays
    gates: Array
    idx: Array | None = None

    def delta(self, layer: int, name: str, x: Float[Array, "B T D"]):
        if name not in self.arrays.A:
            return None
        A_l, B_l, mask_l, w_l = self.arrays.layer(name, layer)
        if self.idx is not None:  # gather the K adapters of each row first
            A_c, B_c = self.arrays.rows(name, layer, self.idx, tokens=x.shape[1])  # B K R D/E
            coef = (w_l[self.idx] * self.gates[..., None]).astype(x.dtype)  # B K R
            u = jnp.einsum("BTD,BKRD->BTKR", x, A_c.astype(x.dtype))
            return jnp.einsum("BTKR,BKRE->BTE", u * coef[:, None], B_c.astype(x.dtype)), {}
        g = self.gates
        r = mask_l.shape[-1]
        if g.ndim == 2:
            g = g[:, :, None]  # B A 1 -> broadcast over R
        else:
            g = g[..., :r]  # pool-wide R_max -> this module's R (valid ROCs are a prefix)
        g = jnp.broadcast_to(g, g.shape[:-1] + (r,))
        return lora_delta(A_l, B_l, self.arrays.scale[name][layer], mask_l, x, g), {}


def dense_delta_weights(arrays: PoolArrays, m: str, weights: Float[Array, " A"]) -> Float[Array, "L D E"]:
    """`sum_i w_i s_i B_i^T A_i` per layer in kernel layout `[in, out]` (inactive adapters skipped)."""
    w = jnp.asarray(weights, arrays.A[m].dtype) * arrays.active.astype(arrays.A[m].dtype)
    coef = masked_scale(arrays.mask[m], arrays.scale[m]) * w[None, :, None]  # L A R
    return jnp.einsum("LAR,LARD,LARE->LDE", coef, arrays.A[m], arrays.B[m])


def merge_into(model, pool: LoraPool | PoolArrays, weights: Sequence[float] | Array):
    """A new `CausalLM` with `W + sum_i w_i s_i B_i^T A_i` merged into every adapted kernel.

    `weights [A]`; the input model is left unchanged (kernels are `[in, out]`).
    """
    from hilora_jax.model.quant import model_weights

    arrays = pool.arrays if isinstance(pool, LoraPool) else pool
    weights = jnp.asarray(weights)
    if weights.shape != (arrays.num_adapters,):
        raise ValueError(f"weights must have shape ({arrays.num_adapters},), got {weights.shape}")
    if (q := model_weights(model)) is not None:
        raise ValueError(f"merge_into: the model has {q} kernels (weights={q!r}); merge into a "
                         "model loaded in a float dtype")
    new = nnx.clone(model)
    for m in arrays.modules:
        dw = dense_delta_weights(arrays, m, weights)  # L D E
        for li, layer in enumerate(new.model.layers):
            kern = getattr(getattr(layer, projection(m).block), m).kernel
            old = kern.get_value()
            kern.set_value((old.astype(jnp.float32) + dw[li].astype(jnp.float32)).astype(old.dtype))
    return new


def pool_shardings(arrays_or_shapes, mesh: Mesh) -> PoolArrays:
    """`NamedSharding` of every pool array (a `PoolArrays` of shardings) on `mesh`."""
    a = arrays_or_shapes

    def spec(m, side, shape):
        return NamedSharding(mesh, shd.logical_to_spec(shd.lora_axes(m, side), shape, mesh,
                                                       what=f"pool {side}[{m}]"))

    rep = shd.replicated(mesh)
    return PoolArrays(
        A={m: spec(m, "A", a.A[m].shape) for m in a.A},
        B={m: spec(m, "B", a.B[m].shape) for m in a.B},
        scale={m: rep for m in a.scale}, mask={m: rep for m in a.mask}, ranks=rep, active=rep)


class LoraPool:
    """A pool: `PoolArrays` (device) plus host metadata, one entry per adapter along axis A.

    Attributes: `arrays`, `names` (tuple), `clusters` (name -> cluster or None), `samples`
    (name -> tuple of example inputs, or None), `sources` (name -> adapter dir / id), `configs`
    (name -> adapter config dict), `mesh` (or None).
    """

    def __init__(self, arrays: PoolArrays, names: Sequence[str], *, clusters=None, samples=None,
                 sources=None, configs=None, mesh: Mesh | None = None):
        self.arrays = arrays
        self.names = tuple(names)
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"duplicate adapter names in pool: {self.names}")
        if arrays.num_adapters != len(self.names):
            raise ValueError(f"{len(self.names)} names for {arrays.num_adapters} adapters")
        self.clusters = {n: (clusters or {}).get(n) for n in self.names}
        self.samples = {n: (samples or {}).get(n) for n in self.names}
        self.sources = {n: (sources or {}).get(n, "") for n in self.names}
        self.configs = {n: (configs or {}).get(n, {}) for n in self.names}
        self.mesh = mesh

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def from_adapters(cls, adapters: Sequence[PeftAdapter], model_cfg: ModelConfig, *,
                      clusters=None, samples=None, dtype=jnp.float32,
                      mesh: Mesh | None = None) -> LoraPool:
        """Stack host adapters (`io.peft.read_adapter`) into a pool; see the module docstring."""
        if not adapters:
            raise ValueError("cannot build an empty pool (no adapters)")
        N = len(adapters)
        A, B, S, M = {}, {}, {}, {}
        for p in family_table(model_cfg):  # Llama's table, or the config's own (T5)
            m, L = p.name, p.num_layers(model_cfg)
            rmax = max((a.shape[0] for ad in adapters for (_, mm), (a, _, _) in ad.modules.items()
                        if mm == m), default=0)
            if rmax == 0:
                continue
            d_in, d_out = p.shape(model_cfg)
            A[m] = np.zeros((L, N, rmax, d_in), np.float32)
            B[m] = np.zeros((L, N, rmax, d_out), np.float32)
            S[m] = np.zeros((L, N, rmax), np.float32)
            M[m] = np.zeros((L, N, rmax), bool)
        for i, ad in enumerate(adapters):
            for (li, m), (a, b, s) in ad.modules.items():
                r = a.shape[0]
                A[m][li, i, :r] = a  # [r, D]
                B[m][li, i, :r] = b  # [r, E]: rows b_ij
                S[m][li, i, :r] = s
                M[m][li, i, :r] = True
        np_arrays = PoolArrays(A=A, B=B, scale=S, mask=M,
                               ranks=np.asarray([ad.r for ad in adapters], np.int32),
                               active=np.ones((N,), bool))
        names = [ad.name for ad in adapters]
        pool = cls(_to_device(np_arrays, dtype, mesh), names, clusters=clusters, samples=samples,
                   sources={ad.name: ad.source for ad in adapters},
                   configs={ad.name: ad.config for ad in adapters}, mesh=mesh)
        return pool

    # -- views and placement ---------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        mods = {m: tuple(self.arrays.A[m].shape) for m in self.arrays.modules}
        return f"LoraPool(N={len(self)}, active={int(self.arrays.active.sum())}, A shapes={mods})"

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"adapter {name!r} is not in the pool ({list(self.names)})") from None

    def _replace(self, arrays: PoolArrays, names=None, mesh=None) -> LoraPool:
        return LoraPool(arrays, names or self.names, clusters=self.clusters, samples=self.samples,
                        sources=self.sources, configs=self.configs, mesh=mesh or self.mesh)

    def shard(self, mesh: Mesh) -> LoraPool:
        """The same pool placed on `mesh` (A: input-side axis, B: output-side axis)."""
        return self._replace(jax.device_put(self.arrays, pool_shardings(self.arrays, mesh)), mesh=mesh)

    def subset(self, keep: Sequence[str] | Sequence[bool] | np.ndarray) -> LoraPool:
        """A view with only `keep` active (names, or a bool mask `[A]`); shapes do not change.

        Inactive adapters keep their slot: every consumer (`GatedHook`, `merge_into`, export) masks
        them out, so the same compiled programs serve every evaluation protocol (seen, unseen-within,
        unseen-cross) without recompiling. Routers should read `arrays.active` to exclude them.
        """
        keep = list(keep) if not isinstance(keep, np.ndarray) else keep
        if len(keep) and isinstance(keep[0], str):
            idx = {self.index(n) for n in keep}
            mask = np.asarray([i in idx for i in range(len(self))])
        else:
            mask = np.asarray(keep, bool)
            if mask.shape != (len(self),):
                raise ValueError(f"keep mask must have shape ({len(self)},), got {mask.shape}")
        active = jnp.asarray(mask & np.asarray(self.arrays.active))
        if self.mesh is not None:
            active = jax.device_put(active, shd.replicated(self.mesh))
        return self._replace(self.arrays.replace(active=active))

    def select(self, names: Sequence[str]) -> LoraPool:
        """A new, smaller pool holding only `names` (in that order); R shrinks to the new max rank."""
        if not names:
            raise ValueError("select needs at least one adapter name")
        idx = np.asarray([self.index(n) for n in names])
        a = self.arrays
        A, B, S, M = {}, {}, {}, {}
        for m in a.modules:
            mk = np.asarray(a.mask[m])[:, idx]  # L A' R
            r = int(mk.sum(-1).max())
            if r == 0:
                continue
            A[m] = np.asarray(a.A[m])[:, idx, :r]
            B[m] = np.asarray(a.B[m])[:, idx, :r]
            S[m] = np.asarray(a.scale[m])[:, idx, :r]
            M[m] = mk[:, :, :r]
        arr = PoolArrays(A=A, B=B, scale=S, mask=M, ranks=np.asarray(a.ranks)[idx],
                         active=np.asarray(a.active)[idx])
        dtype = next(iter(a.A.values())).dtype
        return LoraPool(_to_device(arr, dtype, self.mesh), list(names), clusters=self.clusters,
                        samples=self.samples, sources=self.sources, configs=self.configs,
                        mesh=self.mesh)

    # -- hooks and checks ------------------------------------------------------------------
    def hook(self, gates: Array) -> GatedHook:
        """`GatedHook` with gates `[B, A, R]`, `[B, T, A, R]` or `[B, A]`."""
        return GatedHook(self.arrays, jnp.asarray(gates))

    def adapter_hook(self, weights: Sequence[float], batch: int) -> GatedHook:
        """Per-adapter weights `[A]` for every row of a batch of `batch` sequences."""
        w = jnp.broadcast_to(jnp.asarray(weights, jnp.float32), (batch, len(self)))
        return GatedHook(self.arrays, w)

    def require_samples(self, router_name: str) -> None:
        """Raise if any active adapter has no example inputs (needed by `router_name`)."""
        active = np.asarray(self.arrays.active)
        lacking = [n for n, a in zip(self.names, active, strict=True) if a and not self.samples.get(n)]
        if lacking:
            raise ValueError(f"router {router_name!r} needs example inputs ('samples' or "
                             f"'samples_file' in the pool manifest) for every adapter; missing for "
                             f"{lacking}")

    def module_rank(self, m: str) -> np.ndarray:
        """Valid ROCs `[L, A]` of module `m`."""
        return np.asarray(self.arrays.module_rank(m))


def _to_device(a: PoolArrays, dtype, mesh: Mesh | None) -> PoolArrays:
    host = PoolArrays(
        A={m: np.asarray(v).astype(dtype, copy=False) for m, v in a.A.items()},
        B={m: np.asarray(v).astype(dtype, copy=False) for m, v in a.B.items()},
        scale={m: np.asarray(v, np.float32) for m, v in a.scale.items()},
        mask={m: np.asarray(v, bool) for m, v in a.mask.items()},
        ranks=np.asarray(a.ranks, np.int32), active=np.asarray(a.active, bool))
    if mesh is None:
        return jax.tree.map(jnp.asarray, host)
    return jax.device_put(host, pool_shardings(host, mesh))
