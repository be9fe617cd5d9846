"""Routing hooks: the per-module maths of every router, as pytrees the model calls.

Each hook implements the model's `lora(layer, name, x) -> delta | None` protocol and
`with_aux(layer, name, x) -> (delta, aux)` for routing traces. Hooks are `flax.struct` pytrees: pool
arrays and per-sequence decisions are leaves (new decisions never recompile), strategies and
hyper-parameters are static fields.

Shape legend: B batch, T tokens, A adapters (pool), C candidate slots, R ROCs per adapter,
D module input dim, E module output dim, L layers.

* `HiLoRAHook`: method §3. For each candidate LoRA i of a sequence (from the sequence stage),
  `u_ij(t) = a_ij . x_t`; keep the n_i(module) largest |u| ROCs; delta =
  `kappa * sum_i s_i sum_{j kept} u_ij b_ij`. Two strategies with identical outputs:
  `dense` computes u over the whole pool `[B,T,A,R]` and masks (cost grows with A); `gathered`
  first gathers each sequence's candidates `[B,C,R,D]` (cost independent of A).
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

from hilora_jax.lora.pool import PoolArrays
from hilora_jax.routing.sequence import per_module_counts
from hilora_jax.routing.token import roc_fixed_gates, topn_gates

STRATEGIES = ("dense", "gathered")


def _layer(arrays: PoolArrays, name: str, layer: int):
    A_l = arrays.A[name][layer]  # A R D
    B_l = arrays.B[name][layer]  # A R E
    mask_l = arrays.mask[name][layer] & arrays.active[:, None]  # A R
    w_l = jnp.where(mask_l, arrays.scale[name][layer], 0.0)  # A R  (s_ij on valid ROCs)
    return A_l, B_l, mask_l, w_l


class _Hook:
    """`__call__` from `with_aux` (the aux outputs are only collected when tracing)."""

    def __call__(self, layer: int, name: str, x: Float[Array, "B T D"]):
        out = self.with_aux(layer, name, x)
        return None if out is None else out[0]


@struct.dataclass
class HiLoRAHook(_Hook):
    arrays: PoolArrays
    cand_idx: Int[Array, "B C"]
    cand_valid: Bool[Array, "B C"]
    n_rocs: Int[Array, "B C"]  # adapter-level allotment n_i (sequence stage)
    kappa: Float[Array, " B"]
    strategy: str = struct.field(pytree_node=False, default="gathered")
    topn_method: str = struct.field(pytree_node=False, default="pairwise")

    def with_aux(self, layer: int, name: str, x: Float[Array, "B T D"]):
        if name not in self.arrays.A:
            return None
        A_l, B_l, mask_l, w_l = _layer(self.arrays, name, layer)
        idx = self.cand_idx
        valid_c = mask_l[idx] & self.cand_valid[..., None]  # B C R
        module_rank = valid_c.sum(-1).astype(jnp.int32)  # B C
        n_mod = per_module_counts(self.n_rocs, self.arrays.ranks[idx], module_rank)  # B C
        if self.strategy == "gathered":
            A_c = A_l[idx]  # B C R D
            u = jnp.einsum("BTD,BCRD->BTCR", x, A_c.astype(x.dtype))
            g = topn_gates(u, n_mod, valid_c, method=self.topn_method)  # B T C R
            coef = u * g * (w_l[idx] * valid_c).astype(u.dtype)[:, None]  # B T C R
            delta = jnp.einsum("BTCR,BCRE->BTE", coef, B_l[idx].astype(x.dtype))
        elif self.strategy == "dense":
            u_all = jnp.einsum("BTD,ARD->BTAR", x, A_l.astype(x.dtype))  # B T A R
            u = jnp.take_along_axis(u_all, idx[:, None, :, None], axis=2)  # B T C R
            g = topn_gates(u, n_mod, valid_c, method=self.topn_method)  # B T C R
            onehot = jax.nn.one_hot(idx, A_l.shape[0], dtype=u.dtype) * self.cand_valid[..., None]
            g_all = jnp.einsum("BTCR,BCA->BTAR", g, onehot)  # B T A R
            delta = jnp.einsum("BTAR,ARE->BTE", u_all * g_all * w_l.astype(u.dtype),
                               B_l.astype(x.dtype))
        else:
            raise ValueError(f"unknown strategy {self.strategy!r}; choose from {STRATEGIES}")
        delta = delta * self.kappa[:, None, None].astype(delta.dtype)
        fired = g.sum(-1).astype(jnp.int8)  # B T C: ROCs fired per candidate and token
        return delta, {"fired": fired, "n_module": n_mod}


@struct.dataclass
class RocFixedHook(_Hook):
    arrays: PoolArrays
    budget: int = struct.field(pytree_node=False, default=24)

    def with_aux(self, layer, name, x):
        if name not in self.arrays.A:
            return None
        A_l, B_l, mask_l, w_l = _layer(self.arrays, name, layer)
        u = jnp.einsum("BTD,ARD->BTAR", x, A_l.astype(x.dtype))
        budget = min(self.budget, int(np.prod(mask_l.shape)))
        g = roc_fixed_gates(u, mask_l, budget=budget)
        delta = jnp.einsum("BTAR,ARE->BTE", u * g * w_l.astype(u.dtype), B_l.astype(x.dtype))
        return delta, {"fired": g.sum(-1).astype(jnp.int8)}  # B T A


@struct.dataclass
class ArrowHook(_Hook):
    arrays: PoolArrays
    protos: dict  # module -> [L, A, D] unit prototypes
    top_k: int = struct.field(pytree_node=False, default=3)
    temperature: float = struct.field(pytree_node=False, default=1.0)

    def with_aux(self, layer, name, x):
        if name not in self.arrays.A:
            return None
        A_l, B_l, mask_l, w_l = _layer(self.arrays, name, layer)
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


@struct.dataclass
class SparseMixtureHook(_Hook):
    """Output mixture of a few adapters per sequence, gathered first (cost independent of A).

    `idx [B, K]` adapter indices and `weights [B, K]` (0 for unused slots): delta =
    `sum_k w_k s_k B_k A_k x`, equal to `GatedHook` with the dense `[B, A]` weights.
    """

    arrays: PoolArrays
    idx: Int[Array, "B K"]
    weights: Float[Array, "B K"]

    def with_aux(self, layer, name, x):
        if name not in self.arrays.A:
            return None
        A_l, B_l, mask_l, w_l = _layer(self.arrays, name, layer)
        A_c = A_l[self.idx].astype(x.dtype)  # B K R D
        coef = (w_l[self.idx] * self.weights[..., None]).astype(x.dtype)  # B K R
        u = jnp.einsum("BTD,BKRD->BTKR", x, A_c)
        delta = jnp.einsum("BTKR,BKRE->BTE", u * coef[:, None], B_l[self.idx].astype(x.dtype))
        return delta, {}


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
class FusionHook(_Hook):
    arrays: PoolArrays
    weights: Float[Array, "B A"]

    def with_aux(self, layer, name, x):
        if name not in self.arrays.A:
            return None
        A_l, B_l, mask_l, w_l = _layer(self.arrays, name, layer)
        wts = self.weights.astype(x.dtype)
        m = mask_l.astype(x.dtype)
        A_f = jnp.einsum("BA,AR,ARD->BRD", wts, m, A_l.astype(x.dtype))
        B_f = jnp.einsum("BA,AR,ARE->BRE", wts, w_l.astype(x.dtype), B_l.astype(x.dtype))
        delta = jnp.einsum("BTR,BRE->BTE", jnp.einsum("BTD,BRD->BTR", x, A_f), B_f)
        return delta, {}


def arrow_prototypes(arrays: PoolArrays, method: str = "svd", *, iters: int = 15,
                     init: np.ndarray | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Top right singular vector of `dW = B A` per module, layer and adapter: `{m: [L, A, D]}`.

    `method="svd"` (default) computes it exactly in float64 from the small `r x r` problem: with
    `A^T = Q R_a`, `dW^T dW = Q (R_a^T (B^T B) R_a) Q^T`, so the top eigenvector e of the `r x r`
    matrix gives `v = Q e`. `method="power"` reproduces PEFT's `top_right_singular_vec_from_BA`:
    `iters` float32 power iterations of `v -> A^T (B^T B) (A v)` from the start vector `init [D]`
    (PEFT draws it with `torch.randn(D)` from a generator seeded with `rng_seed`; without `init` a
    NumPy normal vector from `seed` is used). Arrow's logits use `|x . v|`, so signs never matter.
    Adapters absent from a module/layer get a zero prototype.
    """
    if method not in ("svd", "power"):
        raise ValueError(f"prototype method must be 'svd' or 'power', got {method!r}")
    out = {}
    for m in arrays.modules:
        A = np.asarray(arrays.A[m], np.float64)  # L A R D
        B = np.asarray(arrays.B[m], np.float64)  # L A R E
        mask = np.asarray(arrays.mask[m])
        L, N, _, D = A.shape
        if method == "power":
            v0 = (np.asarray(init, np.float32) if init is not None
                  else np.random.default_rng(seed).standard_normal(D).astype(np.float32))
            if v0.shape != (D,):
                raise ValueError(f"power-iteration init must have shape ({D},) for {m}")
        protos = np.zeros((L, N, D), np.float32)
        for li in range(L):
            for i in range(N):
                r = int(mask[li, i].sum())
                if r == 0:
                    continue
                a, b = A[li, i, :r], B[li, i, :r]  # [r, D], [r, E] (rows b_ij)
                if method == "svd":
                    q, ra = np.linalg.qr(a.T)  # D r, r r
                    small = ra @ (b @ b.T) @ ra.T  # b @ b.T = B^T B in PEFT's layout
                    _, evecs = np.linalg.eigh((small + small.T) / 2)
                    v = q @ evecs[:, -1]
                    protos[li, i] = v / (np.linalg.norm(v) + 1e-12)
                else:
                    a32, c32 = a.astype(np.float32), (b @ b.T).astype(np.float32)
                    v = v0 / (np.linalg.norm(v0) + np.float32(1e-8))
                    for _ in range(iters):
                        w = a32.T @ (c32 @ (a32 @ v))
                        v = w / (np.linalg.norm(w) + np.float32(1e-8))
                    protos[li, i] = v
        out[m] = protos
    return out


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
