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
