"""Sequence-level density model of HiLoRA: one Gaussian per LoRA (method §2.1-2.2).

Each LoRA ``i`` of the pool comes with ``m_i`` example inputs; their embeddings (``[m_i, E]``) are
fitted once per pool, host-side, in NumPy float64 (:func:`fit_gaussians`). The result is a
:class:`GaussianBank`, a pytree of float32 arrays that is stored with the pool and scored inside jit
(:func:`log_likelihood`, :func:`scores`).

Shape letters: the embedding-space legend in ``hilora_jax.model.projections`` (E embedding dim,
D modelled dim, W width of the low-rank factor, here ``max_i min(m_i - 1, D)``, >= 1).

Estimators ([choice], method §2.1; S is the sample covariance with 1/(m-1), mu = trace(S)/D):

* ``ledoit_wolf`` (default): ``Sigma = (1 - delta) S + delta mu I``. The intensity ``delta`` is the
  Ledoit-Wolf (2004) formula exactly as in ``sklearn.covariance.ledoit_wolf_shrinkage``: computed on
  centred data with the paper's **1/m** normalisation (``b^2 = min(1/m^2 sum_k ||x_k x_k^T - S_m||^2,
  d^2)``, ``d^2 = ||S_m - mu_m I||^2``, ``||.||^2 = trace(. .^T)/D``, ``S_m`` the 1/m covariance).
  ``delta`` is scale-free, so it is then applied to the method's 1/(m-1) covariance: our ``Sigma``
  equals sklearn's ``ledoit_wolf(X)[0]`` times ``m / (m - 1)``.
* ``ridge``: ``Sigma = S + ridge_eps * mu I`` (``ridge_eps`` is relative to the mean variance mu,
  so it is invariant to the embedding's scale).
* ``diag``: ``Sigma = diag(S) + var_floor * mu`` (floor relative to the mean variance).
* ``pca``: project every embedding onto the top ``d'`` principal directions of the pooled samples
  (centred on the pooled mean), then Ledoit-Wolf in ``d'`` dims; ``d~ = d'``. [choice] The basis is
  fitted on the *distinct* sample rows of the adapters in ``basis_from`` (default: all), so a
  protocol's held-out adapters can be kept out of it and a duplicated adapter does not move it.
  Default ``d' = min(E, distinct_samples - 1, 64)``.
  For LW and ridge the isotropic part ``c = delta mu`` (resp. ``ridge_eps mu``) is floored at
  ``var_floor * mu`` so that a zero shrinkage intensity never yields a singular covariance.

Storage: with ``m << E``, ``Sigma_i = c_i I + U_i U_i^T`` with ``rank(U_i) <= m_i - 1``. We store it
whitened, which also covers the diagonal estimator with one code path::

    Sigma_i = diag(scale_i) (I + Q_i diag(gain_i) Q_i^T) diag(scale_i)

with ``Q_i`` [D, W] orthonormal columns (zero columns as padding, ``gain = 0`` there). For LW/ridge
``scale_i = sqrt(c_i)`` everywhere and ``U_i = sqrt(c_i) Q_i diag(sqrt(gain_i))``
(:meth:`GaussianBank.low_rank_factor`). Mahalanobis distance and log-det then follow from Woodbury
and the matrix determinant lemma without ever forming a D x D matrix::

    w = (z - mu_i) / scale_i,   p = Q_i^T w
    maha = ||w - Q_i p||^2 + sum_k p_k^2 / (1 + gain_k)      (the in-span / out-of-span split avoids
    logdet = 2 sum log scale_i + sum_k log1p(gain_k)           the cancellation of |w|^2 - ...)

Scoring cost is O(B A D W). Einsums use ``precision=HIGHEST`` (TPU default would be bf16 passes).

Calibration [choice] (``calibrate=True``; issue 13): the raw score's scale depends on the embedder,
its dimension and the estimator, so thresholds on it mean nothing fixed. Each adapter's scale is
derived from its own samples, training- and label-free: the leave-one-out log-likelihoods
``l_k = log N(x_k; fit without x_k)`` of its m samples (the same estimator refitted m times on
m - 1 samples, float64; the PCA basis is kept fixed), summarised by ``cal_loc = median_k l_k`` and
``cal_scale = std_k(l_k)`` (ddof 1; 1 if that is 0). [choice, dev] The sample standard deviation,
not 1.4826 * MAD: with m = 20 the MAD of some adapters' LOO values came out 3-5x too small, which
put up to 40% of their own dev inputs below a floor of -3 (benchmarks/bigbench_dg/README.md,
"Calibrated sequence stage"). The calibrated score (:func:`calibrated_scores`)::

    c_i(x) = (log N(z; mu_i, Sigma_i) - cal_loc_i) / cal_scale_i

is 0 for an input exactly as typical of LoRA i as the median of its own held-out samples, about
-1 at one standard deviation below, and it does not depend on other adapters (except
through a PCA basis). Needs m_i >= 3.

Non-finite embeddings: :func:`check_embeddings` raises on host (callers outside jit must use it);
inside jit, a row of ``z`` with any non-finite entry gets ``-inf`` for every adapter, which
:func:`hilora_jax.routing.sequence.sequence_decisions` turns into "no candidates" (base model only),
never into a silent route.
"""

# jaxtyping shape strings are not Python expressions (ruff F722 false positive).
# ruff: noqa: F722

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

ESTIMATORS = ("ledoit_wolf", "ridge", "diag", "pca")
_HI = jax.lax.Precision.HIGHEST
_LOG_2PI = math.log(2.0 * math.pi)


@flax.struct.dataclass
class GaussianBank:
    """One Gaussian per adapter, in whitened low-rank form (see module docstring).

    Fields (shape letters as in the module docstring):
      mean:      [A, D] sample means (in the PCA space for ``pca``).
      scale:     [A, D] square root of the diagonal part of Sigma (constant ``sqrt(c_i)`` for LW/ridge).
      basis:     [A, D, W] orthonormal columns Q_i (whitened coordinates), zero-padded.
      gain:      [A, W] eigenvalue gains >= 0 on those columns (0 on padding).
      logdet:    [A] log det Sigma_i (float64 on host, stored float32).
      shrinkage: [A] Ledoit-Wolf intensity delta_i (0 for ridge / diag).
      proj:      [E, D] PCA projection (``pca`` only, else None).
      proj_mean: [E] pooled mean subtracted before projecting (``pca`` only, else None).
      cal_loc:   [A] median leave-one-out log-likelihood of each adapter's samples (or None).
      cal_scale: [A] standard deviation of those log-likelihoods, > 0 (or None; module docstring).
      estimator: static name of the estimator.
    """

    mean: Float[Array, "A D"]
    scale: Float[Array, "A D"]
    basis: Float[Array, "A D W"]
    gain: Float[Array, "A W"]
    logdet: Float[Array, " A"]
    shrinkage: Float[Array, " A"]
    proj: Float[Array, "E D"] | None = None
    proj_mean: Float[Array, " E"] | None = None
    cal_loc: Float[Array, " A"] | None = None
    cal_scale: Float[Array, " A"] | None = None
    estimator: str = flax.struct.field(pytree_node=False, default="ledoit_wolf")

    @property
    def num_adapters(self) -> int:
        return self.mean.shape[0]

    @property
    def dim(self) -> int:
        """d~: the dimension of z as modelled (E, or d' after PCA)."""
        return self.mean.shape[1]

    @property
    def calibrated(self) -> bool:
        return self.cal_loc is not None

    def low_rank_factor(self) -> tuple[np.ndarray, np.ndarray]:
        """(diag [A, D], U [A, D, W]) with ``Sigma_i = diag(diag_i) + U_i U_i^T`` (float64, host)."""
        scale = np.asarray(self.scale, np.float64)
        u = scale[:, :, None] * np.asarray(self.basis, np.float64)
        u = u * np.sqrt(np.asarray(self.gain, np.float64))[:, None, :]
        return scale**2, u

    def to_dict(self) -> dict[str, Any]:
        """Plain NumPy arrays + the estimator name (for orbax / npz storage with the pool)."""
        out: dict[str, Any] = {"estimator": self.estimator}
        for name in ("mean", "scale", "basis", "gain", "logdet", "shrinkage", "proj", "proj_mean",
                     "cal_loc", "cal_scale"):
            value = getattr(self, name)
            if value is not None:
                out[name] = np.asarray(value)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GaussianBank:
        estimator = d["estimator"]
        if isinstance(estimator, np.ndarray):  # round-tripped through np.savez / orbax
            estimator = str(estimator.item())
        if estimator not in ESTIMATORS:
            raise ValueError(f"unknown estimator {estimator!r}; expected one of {ESTIMATORS}")
        arrays = {
            name: np.asarray(d[name], np.float32)
            for name in ("mean", "scale", "basis", "gain", "logdet", "shrinkage")
        }
        proj = d.get("proj")
        proj_mean = d.get("proj_mean")
        if (proj is None) != (estimator != "pca") or (proj is None) != (proj_mean is None):
            raise ValueError("proj/proj_mean must be present exactly for the 'pca' estimator")
        cal_loc, cal_scale = d.get("cal_loc"), d.get("cal_scale")
        if (cal_loc is None) != (cal_scale is None):
            raise ValueError("cal_loc and cal_scale must be stored together (or neither)")
        if cal_scale is not None and not np.all(np.asarray(cal_scale) > 0):
            raise ValueError("cal_scale must be > 0 for every adapter")
        f32 = lambda a: None if a is None else np.asarray(a, np.float32)
        return cls(**arrays, proj=f32(proj), proj_mean=f32(proj_mean), cal_loc=f32(cal_loc),
                   cal_scale=f32(cal_scale), estimator=estimator)


# ----------------------------------------------------------------------------- fitting (host)


def ledoit_wolf_shrinkage(x: np.ndarray) -> float:
    """LW intensity of ``x`` [m, D] (centred here), sklearn's formula and 1/m convention."""
    x = np.asarray(x, np.float64)
    m, d = x.shape
    if d == 1:
        return 0.0
    xc = x - x.mean(0)
    sq_norms = np.einsum("me,me->m", xc, xc)  # |x_k|^2
    gram = xc @ xc.T  # [m, m]; ||X^T X||_F = ||X X^T||_F
    trace_m = sq_norms.sum() / m  # trace(S_m)
    mu = trace_m / d
    fro2 = np.sum(gram**2) / m**2  # ||S_m||_F^2
    beta = (np.sum(sq_norms**2) / m - fro2) / (d * m)
    delta = (fro2 - 2.0 * mu * trace_m + d * mu**2) / d
    beta = min(beta, delta)
    return 0.0 if beta == 0 else float(beta / delta)


def _label(i: int, names: Sequence[str] | None) -> str:
    return f"adapter {i}" + (f" ({names[i]!r})" if names is not None else "")


def _fit_one(
    x: np.ndarray, estimator: str, ridge_eps: float, var_floor: float, width: int, label: str
) -> tuple[np.ndarray, ...]:
    """Fit one adapter in float64. Returns mean, scale, basis [D, width], gain [width], logdet, delta."""
    m, d = x.shape
    mean = x.mean(0)
    xc = x - mean
    s_diag = np.einsum("me,me->e", xc, xc) / (m - 1)
    mu = s_diag.sum() / d
    if not mu > 0:
        raise ValueError(
            f"{label}: all samples are identical (zero variance); cannot fit a Gaussian"
        )
    basis = np.zeros((d, width))
    gain = np.zeros(width)
    if estimator == "diag":
        scale2 = s_diag + var_floor * mu
        delta = 0.0
    else:
        delta = ledoit_wolf_shrinkage(xc) if estimator in ("ledoit_wolf", "pca") else 0.0
        if estimator == "ridge":
            c, lowrank_w = ridge_eps * mu, 1.0
        else:
            c, lowrank_w = delta * mu, 1.0 - delta
        c = max(c, var_floor * mu)
        # S = V diag(sigma^2 / (m-1)) V^T from the thin SVD of the centred data.
        _, sigma, vt = np.linalg.svd(xc, full_matrices=False)
        keep = min(m - 1, d)
        basis[:, :keep] = vt[:keep].T
        gain[:keep] = lowrank_w * sigma[:keep] ** 2 / ((m - 1) * c)
        scale2 = np.full(d, c)
    logdet = np.sum(np.log(scale2)) + np.sum(np.log1p(gain))
    return mean, np.sqrt(scale2), basis, gain, logdet, delta


def log_likelihood_np(fit: tuple[np.ndarray, ...], y: np.ndarray) -> np.ndarray:
    """float64 ``log N(y_b; .)`` [n] of rows ``y`` [n, D] under one :func:`_fit_one` result."""
    mean, scale, basis, gain, logdet, _ = fit
    w = (np.asarray(y, np.float64) - mean) / scale
    p = w @ basis
    perp = w - p @ basis.T
    maha = np.sum(perp**2, -1) + np.sum(p**2 / (1.0 + gain), -1)
    return -0.5 * (mean.shape[0] * _LOG_2PI + logdet + maha)


def loo_log_likelihoods(
    x: np.ndarray, estimator: str = "ledoit_wolf", *, ridge_eps: float = 1e-3,
    var_floor: float = 1e-6, label: str = "adapter",
) -> np.ndarray:
    """Leave-one-out log-likelihoods [m] of an adapter's (projected) samples ``x`` [m, D]:
    ``l_k = log N(x_k; estimator fitted on the other m - 1 samples)`` (float64)."""
    x = np.asarray(x, np.float64)
    m, d = x.shape
    if m < 3:
        raise ValueError(f"{label}: calibration (leave-one-out) needs at least 3 samples, got {m}")
    width = 1 if estimator == "diag" else max(1, min(m - 2, d))
    out = np.empty(m)
    for k in range(m):
        fit = _fit_one(np.delete(x, k, 0), estimator, ridge_eps, var_floor, width,
                       f"{label} without sample {k}")
        out[k] = log_likelihood_np(fit, x[k : k + 1])[0]
    return out


def calibration_stats(loo: np.ndarray) -> tuple[float, float]:
    """(loc, scale) of leave-one-out log-likelihoods: median and standard deviation (ddof 1;
    1.0 where that is 0)."""
    loo = np.asarray(loo, np.float64)
    loc = float(np.median(loo))
    scale = float(np.std(loo, ddof=1))
    return loc, scale if scale > 0 else 1.0


def fit_gaussians(
    samples: Sequence[np.ndarray],
    estimator: str = "ledoit_wolf",
    *,
    ridge_eps: float = 1e-3,
    var_floor: float = 1e-6,
    pca_dim: int | None = None,
    names: Sequence[str] | None = None,
    calibrate: bool = False,
    basis_from: Sequence[bool] | None = None,
) -> GaussianBank:
    """Fit one Gaussian per adapter from its sample embeddings (host-side, float64).

    Args:
      samples: per adapter an array ``[m_i, E]`` (``m_i >= 2``; ``m_i`` may differ).
      estimator: ``ledoit_wolf`` | ``ridge`` | ``diag`` | ``pca`` (module docstring).
      ridge_eps: ridge added to S, as a fraction of the adapter's mean variance ``trace(S)/E``.
      var_floor: floor on the isotropic / diagonal variance, as a fraction of the mean variance.
      pca_dim: ``d'`` for ``pca`` (default ``min(E, total_samples - 1, 64)``).
      names: optional adapter names, used in error messages.
      calibrate: also store the leave-one-out calibration (module docstring; needs m_i >= 3).
      basis_from: ``pca`` only: [A] bool, the adapters whose samples shape the PCA basis (e.g. the
        active adapters of a protocol); default all.

    Raises:
      ValueError: fewer than 2 samples (3 with ``calibrate``), non-finite values, zero variance,
        or inconsistent E (the message names the adapter index, and its name if given).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; expected one of {ESTIMATORS}")
    if len(samples) == 0:
        raise ValueError("fit_gaussians needs at least one adapter")
    if names is not None and len(names) != len(samples):
        raise ValueError(f"{len(names)} names for {len(samples)} adapters")
    xs = []
    for i, x in enumerate(samples):
        x = np.asarray(x, np.float64)
        if x.ndim != 2:
            raise ValueError(f"{_label(i, names)}: samples must be [m, E], got shape {x.shape}")
        if x.shape[0] < 2:
            raise ValueError(
                f"{_label(i, names)}: needs at least 2 samples to fit a Gaussian, got {x.shape[0]}"
            )
        if not np.all(np.isfinite(x)):
            raise ValueError(f"{_label(i, names)}: samples contain NaN or inf")
        if x.shape[1] != np.shape(samples[0])[1]:
            raise ValueError(f"{_label(i, names)}: embedding dim {x.shape[1]} != {xs[0].shape[1]}")
        if calibrate and x.shape[0] < 3:
            raise ValueError(f"{_label(i, names)}: calibration (leave-one-out) needs at least 3 "
                             f"samples, got {x.shape[0]}")
        xs.append(x)
    e = xs[0].shape[1]
    if basis_from is not None:
        basis_from = np.asarray(basis_from, bool)
        if basis_from.shape != (len(xs),) or not basis_from.any():
            raise ValueError(f"basis_from must be {len(xs)} bools with at least one True, "
                             f"got shape {basis_from.shape}")

    proj = proj_mean = None
    if estimator == "pca":
        use = [x for i, x in enumerate(xs) if basis_from is None or basis_from[i]]
        pooled = np.unique(np.concatenate(use, 0), axis=0)  # distinct rows: duplicates add nothing
        max_dim = min(e, pooled.shape[0] - 1)
        dim = min(max_dim, 64) if pca_dim is None else int(pca_dim)
        if not 1 <= dim <= max_dim:
            raise ValueError(f"pca_dim must be in [1, min(E, distinct_samples - 1) = {max_dim}]")
        proj_mean = pooled.mean(0)
        _, _, vt = np.linalg.svd(pooled - proj_mean, full_matrices=False)
        proj = vt[:dim].T  # [E, d']
        xs = [(x - proj_mean) @ proj for x in xs]
    d = xs[0].shape[1]
    width = 1 if estimator == "diag" else max(1, max(min(x.shape[0] - 1, d) for x in xs))

    fits = [
        _fit_one(x, estimator, ridge_eps, var_floor, width, _label(i, names))
        for i, x in enumerate(xs)
    ]
    mean, scale, basis, gain, logdet, delta = (np.stack(f) for f in zip(*fits, strict=True))
    cal_loc = cal_scale = None
    if calibrate:
        stats = [calibration_stats(loo_log_likelihoods(x, estimator, ridge_eps=ridge_eps,
                                                       var_floor=var_floor, label=_label(i, names)))
                 for i, x in enumerate(xs)]
        cal_loc, cal_scale = (np.asarray(v) for v in zip(*stats, strict=True))
    f32 = lambda a: None if a is None else np.asarray(a, np.float32)
    return GaussianBank(
        mean=f32(mean),
        scale=f32(scale),
        basis=f32(basis),
        gain=f32(gain),
        logdet=f32(logdet),
        shrinkage=f32(delta),
        proj=f32(proj),
        proj_mean=f32(proj_mean),
        cal_loc=f32(cal_loc),
        cal_scale=f32(cal_scale),
        estimator=estimator,
    )


# ----------------------------------------------------------------------------- scoring (jit)


def check_embeddings(z: Any) -> None:
    """Host-side guard: raise ValueError naming the rows of ``z`` [B, E] that are not finite."""
    z = np.asarray(z)
    bad = np.flatnonzero(~np.all(np.isfinite(z.reshape(z.shape[0], -1)), axis=-1))
    if bad.size:
        raise ValueError(
            f"non-finite sentence embeddings in rows {bad.tolist()}; refusing to route"
        )


def log_likelihood(bank: GaussianBank, z: Float[Array, "B E"]) -> Float[Array, "B A"]:
    """``log N(z_b; mu_i, Sigma_i)`` for every row and adapter (jittable; rows with non-finite
    ``z`` give ``-inf`` for every adapter). For ``pca`` this is the density of the projection."""
    z = jnp.asarray(z, jnp.float32)
    finite = jnp.all(jnp.isfinite(z), axis=-1)  # [B]
    y = jnp.where(finite[:, None], z, 0.0)
    if bank.proj is not None:
        y = jnp.einsum("BE,ED->BD", y - bank.proj_mean, bank.proj, precision=_HI)
    w = (y[:, None, :] - bank.mean[None]) / bank.scale[None]  # [B, A, D] whitened residual
    p = jnp.einsum("BAD,ADW->BAW", w, bank.basis, precision=_HI)  # in-span coordinates
    perp = w - jnp.einsum("BAW,ADW->BAD", p, bank.basis, precision=_HI)  # [B, A, D]
    maha = jnp.sum(perp**2, -1) + jnp.sum(p**2 / (1.0 + bank.gain[None]), -1)  # [B, A]
    ll = -0.5 * (bank.dim * _LOG_2PI + bank.logdet[None] + maha)
    return jnp.where(finite[:, None], ll, -jnp.inf)


def scores(bank: GaussianBank, z: Float[Array, "B E"]) -> Float[Array, "B A"]:
    """HiLoRA sequence scores ``s_i(x) = log N(z; mu_i, Sigma_i) / d~`` (method §2.2)."""
    return log_likelihood(bank, z) / bank.dim


def calibrated_scores(bank: GaussianBank, z: Float[Array, "B E"]) -> Float[Array, "B A"]:
    """Calibrated scores ``c_i(x) = (log N(z; mu_i, Sigma_i) - cal_loc_i) / cal_scale_i``
    (module docstring; ``-inf`` for non-finite rows). The bank must be fitted with ``calibrate``."""
    if bank.cal_loc is None:
        raise ValueError("this GaussianBank has no calibration: fit it with calibrate=True")
    return (log_likelihood(bank, z) - bank.cal_loc[None]) / bank.cal_scale[None]
