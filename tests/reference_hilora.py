"""Plain NumPy float64 reference for HiLoRA routing math (method §2-3), loop-based and explicit.

Written independently of ``hilora_jax.routing`` (imports nothing from it) to be obviously correct
rather than fast: dense D x D covariances with slogdet/solve, Python loops and ``sorted`` with
explicit tie-break keys, exact fractions for rounding, iterative overflow. The conventions it
encodes are the project's [choice]s documented in the routing modules:

* LW intensity: Ledoit & Wolf (2004), normalised norm ||M||^2 = trace(M M^T)/D, 1/m covariance;
  applied to the 1/(m-1) covariance. Isotropic part floored at var_floor * mean variance.
* round(x) is round-half-up on the exact decimal value of gamma.
* Non-finite scores and inactive adapters are ineligible; no eligible adapter -> no candidates.
* Overflow above r_i goes, unit by unit, to the most likely candidate that still has room.
* PCA basis: distinct sample rows of the adapters in ``basis_from`` (default all).
* Calibration: leave-one-out log-likelihoods (dense refit on m - 1 samples, PCA basis fixed),
  loc = median, scale = standard deviation with ddof 1 (1 if 0); c = (ll - loc) / scale.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

# ----------------------------------------------------------------------------- Gaussians


def lw_shrinkage(x):
    """Ledoit-Wolf intensity from the paper's definitions, explicit D x D matrices."""
    x = np.asarray(x, np.float64)
    m, d = x.shape
    if d == 1:
        return 0.0
    xc = x - x.mean(0)
    s_m = xc.T @ xc / m
    norm2 = lambda mat: np.trace(mat @ mat.T) / d
    mu = np.trace(s_m) / d
    d2 = norm2(s_m - mu * np.eye(d))
    b2_bar = sum(norm2(np.outer(xc[k], xc[k]) - s_m) for k in range(m)) / m**2
    b2 = min(b2_bar, d2)
    return 0.0 if b2 == 0 else b2 / d2


def _cov(x, estimator, ridge_eps, var_floor):
    """(mean, D x D covariance) of one adapter's samples under ``estimator``."""
    m, d = x.shape
    mean = x.mean(0)
    s = (x - mean).T @ (x - mean) / (m - 1)
    mu = np.trace(s) / d
    if estimator in ("ledoit_wolf", "pca"):
        delta = lw_shrinkage(x)
        cov = (1 - delta) * s + max(delta * mu, var_floor * mu) * np.eye(d)
    elif estimator == "ridge":
        cov = s + max(ridge_eps, var_floor) * mu * np.eye(d)
    elif estimator == "diag":
        cov = np.diag(np.diag(s) + var_floor * mu)
    else:
        raise ValueError(estimator)
    return mean, cov


def _log_density(y, mean, cov):
    diff = y - mean
    _, logdet = np.linalg.slogdet(cov)
    maha = diff @ np.linalg.solve(cov, diff)
    return -0.5 * (len(mean) * math.log(2 * math.pi) + logdet + maha)


def fit(samples, estimator="ledoit_wolf", ridge_eps=1e-3, var_floor=1e-6, pca_dim=None,
        calibrate=False, basis_from=None):
    """Returns dict(means=[...], covs=[...] (D x D), proj=None|[E,D], proj_mean=None|[E],
    cal_loc=None|[A], cal_scale=None|[A])."""
    xs = [np.asarray(x, np.float64) for x in samples]
    for i, x in enumerate(xs):
        if x.shape[0] < 2:
            raise ValueError(f"adapter {i}: too few samples")
        if not np.isfinite(x).all():
            raise ValueError(f"adapter {i}: non-finite")
    proj = proj_mean = None
    if estimator == "pca":
        use = [x for i, x in enumerate(xs) if basis_from is None or basis_from[i]]
        pooled = np.concatenate(use)
        distinct = []  # drop repeated rows (a duplicated adapter adds nothing)
        for row in pooled:
            if not any(np.array_equal(row, q) for q in distinct):
                distinct.append(row)
        pooled = np.array(distinct)
        dim = pca_dim if pca_dim is not None else min(pooled.shape[1], pooled.shape[0] - 1, 64)
        proj_mean = pooled.mean(0)
        cov_pooled = (pooled - proj_mean).T @ (pooled - proj_mean)
        evals, evecs = np.linalg.eigh(cov_pooled)
        proj = evecs[:, np.argsort(evals)[::-1][:dim]]
        xs = [(x - proj_mean) @ proj for x in xs]
    means, covs = [], []
    for x in xs:
        mean, cov = _cov(x, estimator, ridge_eps, var_floor)
        means.append(mean)
        covs.append(cov)
    cal_loc = cal_scale = None
    if calibrate:
        cal_loc, cal_scale = [], []
        for x in xs:
            loo = []
            for k in range(x.shape[0]):
                mean, cov = _cov(np.delete(x, k, 0), estimator, ridge_eps, var_floor)
                loo.append(_log_density(x[k], mean, cov))
            loc = float(np.median(loo))
            mean = sum(loo) / len(loo)
            scale = math.sqrt(sum((v - mean) ** 2 for v in loo) / (len(loo) - 1)) or 1.0
            cal_loc.append(loc)
            cal_scale.append(scale)
    return dict(means=means, covs=covs, proj=proj, proj_mean=proj_mean, cal_loc=cal_loc,
                cal_scale=cal_scale)


def log_likelihood(model, z):
    z = np.asarray(z, np.float64)
    out = np.zeros((z.shape[0], len(model["means"])))
    for b in range(z.shape[0]):
        y = z[b]
        if model["proj"] is not None:
            y = (y - model["proj_mean"]) @ model["proj"]
        for i, (mean, cov) in enumerate(zip(model["means"], model["covs"], strict=True)):
            out[b, i] = _log_density(y, mean, cov)
    return out


def calibrated_scores(model, z):
    ll = log_likelihood(model, z)
    return (ll - np.array(model["cal_loc"])[None]) / np.array(model["cal_scale"])[None]


# ----------------------------------------------------------------------------- sequence level


def round_half_up(x: Fraction) -> int:
    return math.floor(x + Fraction(1, 2))


def softmax(v, tau):
    v = np.asarray(v, np.float64) / tau
    e = np.exp(v - v.max())
    return e / e.sum()


def select_candidates(scores, active, k, max_candidates):
    """Returns (candidate adapter indices sorted by score desc / index asc, n_selected)."""
    elig = [i for i in range(len(scores)) if active[i] and np.isfinite(scores[i])]
    ordered = sorted(elig, key=lambda i: (-scores[i], i))
    if not ordered:
        return [], 0
    s_max = scores[ordered[0]]
    if s_max > 0:
        chosen = [i for i in ordered if scores[i] > 0]
    else:
        c = max(math.ceil(abs(s_max)), k)
        chosen = ordered[: min(c, len(ordered))]
    return chosen[:max_candidates], len(chosen)


def largest_remainder(total, pi):
    x = [total * p for p in pi]
    n = [math.floor(v) for v in x]
    left = total - sum(n)
    queue = sorted(range(len(pi)), key=lambda i: (-(x[i] - n[i]), -pi[i], i))
    for i in queue[:left]:
        n[i] += 1
    return n


def enforce_capacity(n, cap):
    """Repeat until no overflow: cut an over-full LoRA to its rank and hand the excess, one unit
    at a time, to the most likely LoRA (list order) that still has room."""
    n = list(n)
    while True:
        over = [i for i in range(len(n)) if n[i] > cap[i]]
        if not over:
            return n
        i = over[0]
        excess = n[i] - cap[i]
        n[i] = cap[i]
        for _ in range(excess):
            j = next(j for j in range(len(n)) if n[j] < cap[j])
            n[j] += 1


def sequence_decision(
    scores, ranks, active, k=3, gamma=0.4, tau=1.0, max_candidates=8, min_budget=1, n_raw=None
):
    """One sequence. ``n_raw``: optional pre-capacity allocation (to check sample mode's cap step)."""
    cand, n_selected = select_candidates(scores, active, k, max_candidates)
    r = [int(ranks[i]) for i in cand]
    if not cand:
        return dict(cand=[], n=[], budget=0, n_selected=0, cap_binds=False, pi=[])
    budget = round_half_up(Fraction(str(gamma)) * sum(r))
    budget = min(max(budget, min_budget), sum(r))
    pi = softmax([scores[i] for i in cand], tau)
    if n_raw is None:
        n_raw = largest_remainder(budget, pi)
    n = enforce_capacity(n_raw, r)
    return dict(
        cand=cand,
        n=n,
        budget=budget,
        n_selected=n_selected,
        cap_binds=n_selected > max_candidates,
        pi=list(pi),
    )


def calibrated_decision(cal, ranks, active, floor=-3.0, margin=3.0, full_at=0.0, tau=1.0,
                        max_candidates=8, allocation="relative", gamma=0.4):
    """One sequence under the calibrated rule (sequence.py rules 1'-3'), float64 and loops."""
    elig = [i for i in range(len(cal)) if active[i] and np.isfinite(cal[i])]
    ordered = sorted(elig, key=lambda i: (-cal[i], i))
    if not ordered:
        return dict(cand=[], n=[], budget=0, n_selected=0, cap_binds=False, pi=[], coverage=0.0)
    c_max = cal[ordered[0]]
    chosen = [i for i in ordered if cal[i] >= floor and cal[i] >= c_max - margin]
    n_selected = len(chosen)
    cand = chosen[:max_candidates]
    if not cand:
        return dict(cand=[], n=[], budget=0, n_selected=0, cap_binds=False, pi=[], coverage=0.0)
    g = min(max((c_max - floor) / (full_at - floor), 0.0), 1.0)
    r = [int(ranks[i]) for i in cand]
    pi = softmax([cal[i] for i in cand], tau)
    if allocation == "relative":
        n = [min(ri, math.floor(g * ri * math.exp((cal[i] - c_max) / tau) + 0.5))
             for i, ri in zip(cand, r, strict=True)]
        budget = sum(n)
    else:
        budget = min(math.floor(g * float(Fraction(str(gamma))) * sum(r) + 0.5), sum(r))
        n = enforce_capacity(largest_remainder(budget, pi), r)
    return dict(cand=cand, n=n, budget=budget, n_selected=n_selected,
                cap_binds=n_selected > max_candidates, pi=list(pi), coverage=g)


def per_module_count(n, adapter_rank, module_rank):
    if n == 0 or module_rank == 0:
        return 0
    v = round_half_up(Fraction(n * module_rank, adapter_rank))
    return min(max(v, 1), module_rank)


# ----------------------------------------------------------------------------- token level


def topn_keep(u_row, n, valid):
    """Indices of the n valid ROCs with the largest |u| (ties: lower index)."""
    idx = [j for j in range(len(u_row)) if valid[j]]
    return set(sorted(idx, key=lambda j: (-abs(u_row[j]), j))[:n])


def topn_gates(u, n, roc_valid):
    bsz, t, c, r = u.shape
    g = np.zeros(u.shape)
    for b in range(bsz):
        for tt in range(t):
            for ci in range(c):
                for j in topn_keep(u[b, tt, ci], int(n[b, ci]), roc_valid[b, ci]):
                    g[b, tt, ci, j] = 1.0
    return g


def kappa(n_row, mode):
    count = sum(1 for v in n_row if v > 0)
    if mode == "none" or count == 0:
        return 1.0
    if mode.endswith("-eff"):  # participation ratio of the ROC counts
        count = sum(n_row) ** 2 / sum(v * v for v in n_row)
    return 1.0 / math.sqrt(count) if mode.startswith("sqrt") else 1.0 / count


def roc_fixed_gates(u, roc_valid, budget):
    bsz, t, a, r = u.shape
    g = np.zeros(u.shape)
    for b in range(bsz):
        for tt in range(t):
            flat = [(ai, j) for ai in range(a) for j in range(r) if roc_valid[ai][j]]
            flat.sort(key=lambda p: (-abs(u[b, tt, p[0], p[1]]), p[0] * r + p[1]))
            for ai, j in flat[:budget]:
                g[b, tt, ai, j] = 1.0
    return g
