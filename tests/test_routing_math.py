"""HiLoRA routing math (hilora_jax.routing.{gaussian,sequence,token}) against the float64 reference."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference_hilora as ref
from sklearn.covariance import ledoit_wolf, ledoit_wolf_shrinkage

from hilora_jax.routing.gaussian import (
    GaussianBank,
    check_embeddings,
    fit_gaussians,
    log_likelihood,
    scores,
)
from hilora_jax.routing.sequence import enforce_capacity, per_module_counts, sequence_decisions
from hilora_jax.routing.token import kappa, roc_fixed_gates, topn_gates

# ----------------------------------------------------------------------------- Gaussians


def _samples(rng, a, e, m_range=(2, 25)):
    out = []
    for _ in range(a):
        m = int(rng.integers(*m_range))
        scale = rng.uniform(0.3, 3.0, size=e)  # anisotropic
        out.append(rng.normal(size=(m, e)) * scale + rng.normal(size=e) * 2)
    return out


@pytest.mark.parametrize("seed", range(3))
def test_lw_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    xs = _samples(rng, 4, 37, (2, 50))  # includes m > E for some adapters? (E=37, m up to 49)
    bank = fit_gaussians(xs)
    diag, u = bank.low_rank_factor()
    for i, x in enumerate(xs):
        m = x.shape[0]
        cov_sk, shrink_sk = ledoit_wolf(x)
        assert bank.shrinkage[i] == pytest.approx(ledoit_wolf_shrinkage(x), rel=1e-6)
        assert shrink_sk == pytest.approx(ref.lw_shrinkage(x), rel=1e-10)
        sigma = np.diag(diag[i]) + u[i] @ u[i].T  # 1/(m-1) convention
        np.testing.assert_allclose(sigma * (m - 1) / m, cov_sk, rtol=2e-5, atol=1e-6 * cov_sk.max())


@pytest.mark.parametrize("estimator", ["ledoit_wolf", "ridge", "diag", "pca"])
def test_log_likelihood_matches_reference(estimator):
    ll_fn = jax.jit(log_likelihood)
    for seed, (a, e) in enumerate([(5, 16), (3, 40), (7, 9)]):
        rng = np.random.default_rng(100 + seed)
        xs = _samples(rng, a, e)
        bank = fit_gaussians(xs, estimator)
        model = ref.fit(xs, estimator)
        z = np.concatenate([rng.normal(size=(6, e)) * 2, xs[0][:2], xs[-1][:2] + 0.1])
        got = np.asarray(ll_fn(bank, z))
        want = ref.log_likelihood(model, z)
        np.testing.assert_allclose(got, want, rtol=1e-4)
        np.testing.assert_allclose(np.asarray(scores(bank, z)), want / bank.dim, rtol=1e-4)
        assert bank.dim == (model["proj"].shape[1] if estimator == "pca" else e)


def test_pca_dim_and_bank_roundtrip(tmp_path):
    rng = np.random.default_rng(7)
    xs = _samples(rng, 3, 30, (5, 8))
    total = sum(len(x) for x in xs)
    assert fit_gaussians(xs, "pca").dim == min(30, total - 1, 64)
    bank = fit_gaussians(xs, "pca", pca_dim=5)
    np.testing.assert_allclose(
        ref.log_likelihood(ref.fit(xs, "pca", pca_dim=5), xs[1]),
        np.asarray(log_likelihood(bank, xs[1])),
        rtol=1e-4,
    )
    np.savez(tmp_path / "bank.npz", **bank.to_dict())
    loaded = GaussianBank.from_dict(dict(np.load(tmp_path / "bank.npz")))
    assert loaded.estimator == "pca"
    np.testing.assert_array_equal(log_likelihood(loaded, xs[0]), log_likelihood(bank, xs[0]))
    # a bank is a pytree: it passes through jit as an argument.
    leaves = jax.tree_util.tree_leaves(loaded)
    assert len(leaves) == 8
    with pytest.raises(ValueError, match="pca_dim"):
        fit_gaussians(xs, "pca", pca_dim=total)


def test_fit_errors_name_the_adapter():
    rng = np.random.default_rng(0)
    good = rng.normal(size=(5, 8))
    with pytest.raises(ValueError, match=r"adapter 1 \('b'\).*at least 2 samples"):
        fit_gaussians([good, good[:1]], names=["a", "b"])
    with pytest.raises(ValueError, match=r"adapter 1\b.*at least 2"):
        fit_gaussians([good, good[:1]])
    bad = good.copy()
    bad[2, 3] = np.nan
    with pytest.raises(ValueError, match=r"adapter 0 \('x'\).*NaN"):
        fit_gaussians([bad, good], names=["x", "y"])
    with pytest.raises(ValueError, match="adapter 1.*zero variance"):
        fit_gaussians([good, np.ones((4, 8))])
    with pytest.raises(ValueError, match="unknown estimator"):
        fit_gaussians([good], "full")


def test_non_finite_embedding_never_routes():
    rng = np.random.default_rng(1)
    bank = fit_gaussians(_samples(rng, 4, 12))
    z = rng.normal(size=(3, 12)).astype(np.float32)
    z[1, 5] = np.nan
    z[2, 0] = np.inf
    with pytest.raises(ValueError, match=r"rows \[1, 2\]"):
        check_embeddings(z)
    check_embeddings(z[:1])
    s = np.asarray(jax.jit(scores)(bank, z))
    assert np.isfinite(s[0]).all() and np.all(s[1:] == -np.inf)
    dec = jax.jit(sequence_decisions)(s, jnp.full(4, 8), jnp.ones(4, bool))
    assert not np.asarray(dec.cand_valid[1:]).any()
    assert np.all(np.asarray(dec.budget[1:]) == 0) and np.all(np.asarray(dec.n_rocs[1:]) == 0)
    assert np.asarray(dec.cand_valid[0]).any()


def test_separated_tasks_route_to_own_adapter():
    """8 well-separated synthetic tasks, E=64, m=20: own adapter is the top candidate >= 99%."""
    rng = np.random.default_rng(3)
    e, tasks, m, n_test = 64, 8, 20, 100
    centers = rng.normal(size=(tasks, e)) * 0.8  # noise 1 per dim; centers ~9 apart
    basis = [np.linalg.qr(rng.normal(size=(e, e)))[0][:, :6] for _ in range(tasks)]

    def draw(t, n):
        return centers[t] + rng.normal(size=(n, e)) + rng.normal(size=(n, 6)) @ basis[t].T * 2

    train = [draw(t, m) for t in range(tasks)]
    test = np.concatenate([draw(t, n_test) for t in range(tasks)])
    labels = np.repeat(np.arange(tasks), n_test)
    for estimator, kw in [("ledoit_wolf", {}), ("diag", {}), ("pca", {"pca_dim": 24})]:
        bank = fit_gaussians(train, estimator, **kw)
        s = jax.jit(scores)(bank, test)
        dec = jax.jit(sequence_decisions)(s, jnp.full(tasks, 8), jnp.ones(tasks, bool))
        acc = np.mean(np.asarray(dec.cand_idx[:, 0]) == labels)
        assert acc >= 0.99, (estimator, acc)


# ----------------------------------------------------------------------------- sequence level

CONFIGS = [  # (A, k, gamma, max_candidates, min_budget, tau)
    (1, 3, 0.4, 8, 1, 1.0),
    (5, 3, 0.4, 8, 1, 1.0),
    (12, 3, 0.4, 4, 1, 1.0),
    (12, 2, 0.5, 8, 3, 0.5),
    (9, 3, 0.25, 3, 1, 2.0),
    (20, 4, 0.35, 8, 1, 1.0),
]


def _random_scores(rng, b, a):
    """Rows mixing positive maxima, all-negative maxima of various size, and exact ties."""
    kind = rng.integers(0, 4, size=b)
    s = rng.normal(size=(b, a)) * 2
    s[kind == 1] -= rng.uniform(0.5, 12, size=((kind == 1).sum(), 1))  # all negative, deep OOD
    s[kind == 2] = np.round(s[kind == 2])  # many exact ties (also at the cap boundary)
    s[kind == 3] = np.round(s[kind == 3] * 2) / 2 - 1.0
    return s.astype(np.float32)


def _check_row(dec, b, want, ranks):
    c = len(want["cand"])
    idx = np.asarray(dec.cand_idx[b])
    valid = np.asarray(dec.cand_valid[b])
    assert valid.sum() == c and valid[:c].all()
    assert idx[:c].tolist() == want["cand"]
    assert np.asarray(dec.n_rocs[b])[:c].tolist() == want["n"]
    assert not np.asarray(dec.n_rocs[b])[c:].any()
    assert int(dec.budget[b]) == want["budget"] == int(np.asarray(dec.n_rocs[b]).sum())
    assert int(dec.n_selected[b]) == want["n_selected"]
    assert bool(dec.cap_binds[b]) == want["cap_binds"]
    assert all(n <= ranks[i] for n, i in zip(want["n"], want["cand"], strict=True))


@pytest.mark.parametrize("cfg", CONFIGS)
def test_expected_mode_matches_reference(cfg):
    a, k, gamma, max_c, min_b, tau = cfg
    rng = np.random.default_rng(a * 1000 + max_c)
    b = 96
    fn = jax.jit(
        functools.partial(
            sequence_decisions,
            k=k,
            gamma=gamma,
            tau=tau,
            max_candidates=max_c,
            min_budget=min_b,
        )
    )
    counts = dict(cap=0, neg=0, overflow=0)
    for _ in range(2):
        s = _random_scores(rng, b, a)
        ranks = rng.choice([1, 2, 4, 8, 16], size=(b, a))  # per-row ranks: broadcasting path
        active = rng.random((b, a)) > 0.15
        dec = fn(s, ranks, active)
        for row in range(b):
            want = ref.sequence_decision(
                s[row], ranks[row], active[row], k, gamma, tau, max_c, min_b
            )
            _check_row(dec, row, want, ranks[row])
            counts["cap"] += want["cap_binds"]
            counts["neg"] += bool(want["cand"]) and s[row][want["cand"][0]] <= 0
            raw = ref.largest_remainder(want["budget"], want["pi"]) if want["cand"] else []
            counts["overflow"] += raw != want["n"]
    if a > max_c:  # the cases exercise what they are meant to
        assert counts["cap"] > 0
    if a >= 5:
        assert counts["neg"] > 0 and counts["overflow"] > 0


def test_selection_rules_by_hand():
    s = np.array(
        [
            [0.5, 0.2, -1.0, 3.0, 0.1],  # positive max: all positives
            [-2.3, -0.5, -4.0, -0.1, -0.7],  # max -0.1: ceil(0.1)=1 < k -> top 3
            [-5.2, -6.0, -7.0, -8.0, -9.0],  # ceil(5.2)=6 capped at N=5 -> all
            [-1.0, -1.0, -1.0, -1.0, -1.0],  # ties: lower index first
        ],
        np.float32,
    )
    ranks = np.array([8, 4, 8, 2, 6])
    dec = sequence_decisions(s, ranks, np.ones(5, bool), max_candidates=4)
    assert dec.cand_idx[0, :4].tolist() == [3, 0, 1, 4]
    assert dec.n_selected.tolist() == [4, 3, 5, 3]
    assert dec.cap_binds.tolist() == [False, False, True, False]
    assert dec.cand_idx[3, :3].tolist() == [0, 1, 2]
    # Row 0: O = round(0.4 * 20) = 8 ; row 1: candidates 3,1,4 -> round(0.4*12)=5.
    assert dec.budget.tolist()[:2] == [8, 5]
    # Inactive adapters are never candidates.
    act = np.array([True, True, True, False, True])
    dec = sequence_decisions(s, ranks, act)
    assert 3 not in dec.cand_idx[0][np.asarray(dec.cand_valid[0])].tolist()


def test_capacity_matches_iterative_reference():
    rng = np.random.default_rng(5)
    b, c = 200, 6
    cap = rng.integers(0, 9, size=(b, c))
    valid = np.arange(c)[None] < rng.integers(1, c + 1, size=(b, 1))
    cap = np.where(valid, cap, 0)
    total = (rng.random(b) * (cap.sum(-1) + 1)).astype(int).clip(0, cap.sum(-1))
    n_raw = np.zeros((b, c), int)
    for row in range(b):  # random raw allocation of `total` over the valid slots
        nv = valid[row].sum()
        n_raw[row, :nv] = rng.multinomial(total[row], np.ones(nv) / nv)
    got = np.asarray(jax.jit(enforce_capacity)(n_raw, cap, valid))
    for row in range(b):
        nv = valid[row].sum()
        want = ref.enforce_capacity(n_raw[row, :nv].tolist(), cap[row, :nv].tolist())
        assert got[row, :nv].tolist() == want
        assert got[row].sum() == total[row]


def _sample_fn(**kw):
    return jax.jit(functools.partial(sequence_decisions, mode="sample", **kw))


def test_sample_mode_reproducible_batch_independent_and_capped():
    rng = np.random.default_rng(11)
    b, a = 32, 10
    s = _random_scores(rng, b, a)
    ranks = rng.choice([2, 4, 8], size=a)
    active = np.ones(a, bool)
    fn = _sample_fn()
    keys = jax.random.split(jax.random.key(0), b)
    d1, d2 = fn(s, ranks, active, key=keys), fn(s, ranks, active, key=keys)
    np.testing.assert_array_equal(d1.n_rocs, d2.n_rocs)
    # Changing batch-mates (rows 1:) leaves row 0 unchanged: per-row keys and a single folded key.
    s_other = s.copy()
    s_other[1:] = _random_scores(rng, b - 1, a)
    for key in (keys, jax.random.key(3), jax.random.PRNGKey(3)):
        x, y = fn(s, ranks, active, key=key), fn(s_other, ranks, active, key=key)
        np.testing.assert_array_equal(x.n_rocs[0], y.n_rocs[0])
    # Per-sequence keys: a row gives the same result alone as inside the batch.
    alone = fn(s[5:6], ranks, active, key=keys[5:6])
    np.testing.assert_array_equal(alone.n_rocs[0], d1.n_rocs[5])
    # Different keys give different draws somewhere; invariants hold.
    d3 = fn(s, ranks, active, key=jax.random.split(jax.random.key(1), b))
    assert not np.array_equal(d1.n_rocs, d3.n_rocs)
    for d in (d1, d3):
        n = np.asarray(d.n_rocs)
        r = np.where(d.cand_valid, ranks[np.asarray(d.cand_idx)], 0)
        assert (n.sum(-1) == np.asarray(d.budget)).all() and (n <= r).all()
        np.testing.assert_array_equal(d.cand_idx, d3.cand_idx)
    expected = sequence_decisions(s, ranks, active)
    np.testing.assert_array_equal(d1.budget, expected.budget)


def test_sample_mode_mean_matches_budget_times_pi():
    s = np.array([[0.5, 0.2, 0.45, -0.3, 0.1, 0.6]], np.float32)
    ranks = np.full(6, 64)  # max pi * O < 64: capacity never binds
    n_keys = 4000
    fn = _sample_fn(gamma=0.5)
    keys = jax.random.split(jax.random.key(42), n_keys)
    s_rep = np.repeat(s, n_keys, 0)
    dec = fn(s_rep, ranks, np.ones(6, bool), key=keys)
    n = np.asarray(dec.n_rocs, np.float64)
    o = int(dec.budget[0])
    pi = np.asarray(dec.probs[0], np.float64)
    want = ref.sequence_decision(s[0], ranks, np.ones(6, bool), gamma=0.5)
    assert o == want["budget"] == 160
    np.testing.assert_allclose(pi[:5], want["pi"], rtol=1e-5)
    mean, std = n.mean(0), np.sqrt(o * pi * (1 - pi) / n_keys)
    assert (o * pi).max() < 50
    assert np.all(np.abs(mean - o * pi) < 5 * std + 1e-9), (mean, o * pi)


def test_per_module_counts_matches_reference():
    rng = np.random.default_rng(9)
    b, c = 64, 5
    r = rng.choice([1, 4, 8, 16], size=(b, c))
    n = (rng.random((b, c)) * (r + 1)).astype(int)
    mr = np.where(rng.random((b, c)) < 0.2, 0, rng.choice([1, 2, 4, 8, 16, 32], size=(b, c)))
    mr[:8] = r[:8]  # same rank: counts unchanged
    got = np.asarray(jax.jit(per_module_counts)(n, r, mr))
    want = np.vectorize(ref.per_module_count)(n, r, mr)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got[:8], np.where(mr[:8] > 0, n[:8], 0))
    # Candidate-only adapter ranks [C] broadcast over the batch.
    got_c = per_module_counts(n, r[0], mr)
    np.testing.assert_array_equal(got_c, np.vectorize(ref.per_module_count)(n, r[0][None], mr))


# ----------------------------------------------------------------------------- token level


@pytest.mark.parametrize("method", ["pairwise", "sort"])
def test_topn_gates_match_reference_with_ties(method):
    rng = np.random.default_rng(21)
    b, t, c, r = 3, 7, 4, 9
    fn = jax.jit(functools.partial(topn_gates, method=method))
    for trial in range(3):
        u = rng.normal(size=(b, t, c, r)).astype(np.float32)
        if trial > 0:  # many exact |u| ties, including +-x pairs
            u = np.round(u * 2) / 2 * rng.choice([-1, 1], size=u.shape)
        valid = np.arange(r)[None, None] < rng.integers(1, r + 1, size=(b, c, 1))
        n = rng.integers(0, r + 2, size=(b, c))  # n may exceed the valid count
        got = np.asarray(fn(u, n, valid))
        want = ref.topn_gates(u, n, valid)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(
            got.sum(-1), np.minimum(n, valid.sum(-1))[:, None].repeat(t, 1)
        )
    assert fn._cache_size() == 1  # n varies, no recompilation


def test_kappa():
    n = np.array([[0, 0, 0], [3, 0, 0], [1, 2, 0], [1, 1, 5]])
    for mode in ("none", "sqrt", "mean"):
        got = np.asarray(jax.jit(kappa, static_argnames="mode")(n, mode=mode))
        np.testing.assert_allclose(got, [ref.kappa(row, mode) for row in n], rtol=1e-6)
    with pytest.raises(ValueError):
        kappa(n, "max")


def test_roc_fixed_gates_match_reference():
    rng = np.random.default_rng(31)
    b, t, a, r = 2, 5, 6, 8
    valid = np.arange(r)[None] < rng.integers(1, r + 1, size=(a, 1))
    fn = jax.jit(roc_fixed_gates, static_argnames="budget")
    for budget in (24, 5, 100):
        u = np.round(rng.normal(size=(b, t, a, r)) * 2).astype(np.float32) / 2
        got = np.asarray(fn(u, valid, budget=budget))
        np.testing.assert_array_equal(got, ref.roc_fixed_gates(u, valid, budget))
        assert (got.sum((-1, -2)) == min(budget, valid.sum())).all()


def test_signed_zero_padding_invariance_and_vmap():
    s = np.array([[0.0, -0.0, -0.0, 0.0, -2.0]], np.float32)  # max s = 0 -> top-k, ties by index
    dec = sequence_decisions(s, np.full(5, 4), np.ones(5, bool))
    assert dec.cand_idx[0, :3].tolist() == [0, 1, 2] and int(dec.n_selected[0]) == 3
    # Padding the pool with inactive adapters changes nothing.
    rng = np.random.default_rng(2)
    s = _random_scores(rng, 32, 7)
    ranks = rng.choice([2, 4, 8], size=7)
    base = sequence_decisions(s, ranks, np.ones(7, bool), max_candidates=5)
    s_pad = np.concatenate([s, rng.normal(size=(32, 3)).astype(np.float32) + 5], 1)
    act = np.arange(10) < 7
    padded = sequence_decisions(s_pad, np.concatenate([ranks, [8, 8, 8]]), act, max_candidates=5)
    for f in ("cand_idx", "cand_valid", "n_rocs", "budget", "n_selected", "cap_binds"):
        np.testing.assert_array_equal(getattr(base, f), getattr(padded, f), err_msg=f)
    # vmap over an extra leading axis == separate calls.
    s3 = _random_scores(rng, 3 * 8, 7).reshape(3, 8, 7)
    fn = functools.partial(sequence_decisions, ranks=ranks, active=np.ones(7, bool))
    batched = jax.jit(jax.vmap(fn))(s3)
    for g in range(3):
        np.testing.assert_array_equal(batched.n_rocs[g], fn(s3[g]).n_rocs)
        np.testing.assert_array_equal(batched.cand_idx[g], fn(s3[g]).cand_idx)


# ----------------------------------------------------------------------------- token stage hooks


def _mixed_pool(rng, n_layers=2, d=6, f=10):
    """Mixed ranks (1-9) and targets, one adapter without some layer, one inactive, a module no
    adapter of this pool adapts at all (k_proj: all ROCs masked). Integer-valued A and x (and
    half-integer B, scale), so every response is exact in float32: ties are exact, and the
    strategies must pick the very same ROCs as the float64 reference."""
    from hilora_jax.lora.pool import PoolArrays

    ranks = [3, 8, 1, 8, 5, 9, 2]
    targets = {0: ("q_proj", "v_proj"), 1: ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                            "up_proj", "down_proj"),
               2: ("q_proj", "v_proj"), 3: ("v_proj", "up_proj", "gate_proj", "down_proj"),
               4: ("q_proj", "gate_proj", "up_proj", "o_proj"), 5: ("q_proj", "v_proj"),
               6: ("down_proj", "v_proj")}
    shapes = {"q_proj": (d, d), "k_proj": (d, 4), "v_proj": (d, 4), "o_proj": (d, d),
              "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}
    n, rmax = len(ranks), max(ranks)
    A, B, S, M = {}, {}, {}, {}
    for m, (di, do) in shapes.items():
        mask = np.zeros((n_layers, n, rmax), bool)
        for i, r in enumerate(ranks):
            if m in targets[i] and m != "k_proj":
                mask[:, i, :r] = True
        mask[1, 3] = False  # adapter 3 has no ROCs at layer 1
        if m == "q_proj":
            mask[0, 4, 3:] = False  # adapter 4 has a lower rank at layer 0 of q_proj
        A[m] = rng.integers(-2, 3, (n_layers, n, rmax, di)).astype(np.float32) * mask[..., None]
        A[m][:, :, 1] = -A[m][:, :, 0]  # |u| ties between ROC 0 and 1 of every adapter
        A[m] *= mask[..., None]
        B[m] = (rng.integers(-4, 5, (n_layers, n, rmax, do)) / 2).astype(np.float32) * mask[..., None]
        scale = np.where(np.arange(n) == 5, 16 / np.sqrt(9), 2.0)  # adapter 5: rsLoRA-like
        S[m] = (np.broadcast_to(scale[None, :, None], mask.shape) * mask).astype(np.float32)
        M[m] = mask
    active = np.ones(n, bool)
    active[2] = False
    arrays = PoolArrays(A={m: jnp.asarray(v) for m, v in A.items()},
                        B={m: jnp.asarray(v) for m, v in B.items()},
                        scale={m: jnp.asarray(v) for m, v in S.items()},
                        mask={m: jnp.asarray(v) for m, v in M.items()},
                        ranks=jnp.asarray(ranks, jnp.int32), active=jnp.asarray(active))
    return arrays, shapes


def _reference_token_stage(arrays, layer, name, x, cand, valid, n_rocs, kap):
    A = np.asarray(arrays.A[name][layer], np.float64)
    B = np.asarray(arrays.B[name][layer], np.float64)
    S = np.asarray(arrays.scale[name][layer], np.float64)
    M = np.asarray(arrays.mask[name][layer]) & np.asarray(arrays.active)[:, None]
    ranks = np.asarray(arrays.ranks)
    out = np.zeros(x.shape[:2] + (B.shape[-1],))
    fired = np.zeros(x.shape[:2] + (cand.shape[1],), int)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            for c in range(cand.shape[1]):
                if not valid[b, c]:
                    continue
                i = cand[b, c]
                n_mod = ref.per_module_count(int(n_rocs[b, c]), int(ranks[i]), int(M[i].sum()))
                u = A[i] @ x[b, t]
                keep = ref.topn_keep(u, n_mod, M[i])
                fired[b, t, c] = len(keep)
                for j in keep:
                    out[b, t] += kap[b] * S[i, j] * u[j] * B[i, j]
    return out, fired


@pytest.mark.parametrize("t", [1, 5])
def test_token_stage_strategies_match_reference_mixed_pool(t):
    """dense / gathered / packed / auto: identical gates and deltas (float64 reference) over a
    pool of mixed ranks and targets with exact |u| ties, inactive and layer-less adapters,
    candidate sets of different sizes (incl. an inactive candidate and an empty row)."""
    from hilora_jax.routing.hooks import STRATEGIES, HiLoRAHook

    rng = np.random.default_rng(41)
    arrays, shapes = _mixed_pool(rng)
    cand = np.array([[1, 3, 4, 5, 0, 6], [5, 2, 1, 0, 0, 0], [6, 4, 0, 0, 0, 0],
                     [0, 0, 0, 0, 0, 0], [3, 6, 5, 4, 1, 0]], np.int32)
    valid = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0],
                      [0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]], bool)
    ranks = np.asarray(arrays.ranks)
    n_rocs = np.where(valid, rng.integers(1, 10, cand.shape), 0)
    n_rocs = np.minimum(n_rocs, ranks[cand]) * valid
    kap = np.asarray(kappa(n_rocs, "sqrt"))
    hook = HiLoRAHook(arrays, jnp.asarray(cand), jnp.asarray(valid), jnp.asarray(n_rocs),
                      jnp.asarray(kap))
    xs = {m: rng.integers(-3, 4, (cand.shape[0], t, d_in)).astype(np.float32)
          for m, (d_in, _) in shapes.items()}
    x_qkv = xs["q_proj"]  # q, k, v (and gate, up) read the same x in the model
    xs["k_proj"] = xs["v_proj"] = x_qkv
    xs["up_proj"] = xs["gate_proj"]
    assert set(STRATEGIES) == {"dense", "gathered", "packed", "auto"}
    packed = hook.prepared("packed")
    assert packed.pack is hook.prepared("auto").pack  # packed once per pool
    for layer in range(2):
        want = {m: _reference_token_stage(arrays, layer, m, xs[m].astype(np.float64), cand,
                                          valid, n_rocs, kap) for m in shapes}
        assert want["q_proj"][1].sum() > 0 and want["k_proj"][1].sum() == 0
        for strategy in STRATEGIES:
            h = hook.prepared(strategy)

            # one trace asks for every module the way the model does (one `deltas` call per
            # input): packed shares q/k/v and gate/up
            @jax.jit
            def run(h, xs, layer=layer):
                out = {}
                for g in (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"),
                          ("down_proj",)):
                    out.update(zip(g, h.deltas(layer, g, xs[g[0]]), strict=True))
                return out

            got = run(h, xs)
            for m in shapes:
                delta, aux = got[m]
                np.testing.assert_array_equal(np.asarray(aux["fired"]), want[m][1],
                                              err_msg=f"{strategy} {m} layer {layer}")
                np.testing.assert_allclose(np.asarray(delta), want[m][0], rtol=1e-6, atol=1e-4,
                                           err_msg=f"{strategy} {m} layer {layer}")
            # a module called alone (nothing shared) gives the same
            alone = jax.jit(lambda h, x, layer=layer: h.delta(layer, "v_proj", x))(h, x_qkv)
            np.testing.assert_array_equal(np.asarray(alone[0]), np.asarray(got["v_proj"][0]))


def test_packed_needs_pack_and_auto_choice():
    from hilora_jax.routing.hooks import HiLoRAHook, token_cost

    rng = np.random.default_rng(5)
    arrays, _ = _mixed_pool(rng)
    hook = HiLoRAHook(arrays, jnp.zeros((2, 3), jnp.int32), jnp.zeros((2, 3), bool),
                      jnp.zeros((2, 3), jnp.int32), jnp.ones(2), strategy="packed")
    with pytest.raises(ValueError, match="RocPack"):
        hook(0, "q_proj", jnp.ones((2, 1, 6)))
    with pytest.raises(ValueError, match="unknown strategy"):
        hook.prepared("bogus")
    # auto without a pack picks between dense and gathered; with a pack, packed wins here
    # (7 adapters, P = 36 valid q ROCs vs C x R = 27 per row, but B x C x R = 54 rows read)
    assert hook.replace(strategy="auto").choose("q_proj", (2, 1, 6)) in ("dense", "gathered")
    assert hook.prepared("auto").choose("q_proj", (2, 1, 6)) == "packed"
    costs = {s: token_cost(s, b=8, t=1, c=8, a=512, r=8, p=512 * 8, d=576, e=576)
             for s in ("dense", "gathered", "packed")}
    assert min(costs, key=costs.get) == "gathered"  # huge pool, few candidates


def test_int8_pack_equals_the_dequantized_pool_and_bounds_each_weight():
    """`pack_rocs(arrays, "int8")`: int8 rows with a float32 scale per ROC, every weight within
    scale/2 of the float pack's; the packed token stage over it gives the gates and deltas of the
    float64 reference run on the pool whose ROCs are those dequantised rows (so the scales are
    folded in exactly: responses times scale_a, coefficients times scale_b), incl. the mixed
    pool's exact |u| ties (a ROC and its negation quantise to negated rows)."""
    from hilora_jax.routing.hooks import HiLoRAHook, pack_rocs, quantize_rows

    rng = np.random.default_rng(41)
    arrays, shapes = _mixed_pool(rng)
    arrays = arrays.replace(A={m: a * (1 + rng.random(a.shape[:3] + (1,), np.float32))
                               for m, a in arrays.A.items()})  # not integer multiples of a scale
    fp, q8 = pack_rocs(arrays), pack_rocs(arrays, "int8")
    assert fp.weights is None and q8.weights == "int8" and q8 is pack_rocs(arrays, "int8")
    for rows, qrows, scales in ((fp.A, q8.A, q8.A_scale), (fp.B, q8.B, q8.B_scale)):
        assert rows.keys() == qrows.keys() == scales.keys()
        for k in rows:
            for a, q, s in zip(rows[k], qrows[k], scales[k], strict=True):
                assert q.dtype == jnp.int8 and s.dtype == jnp.float32 and s.shape == a.shape[:1]
                err = np.abs(np.asarray(q, np.float32) * np.asarray(s)[:, None] - np.asarray(a))
                assert np.all(err <= np.asarray(s)[:, None] / 2 * (1 + 1e-5)), k  # fp32 rounding
    with pytest.raises(ValueError, match="pack weights 'int4'"):
        pack_rocs(arrays, "int4")

    def deq(a):  # the same per-ROC quantisation of the rank-padded pool arrays, dequantised
        q, s = quantize_rows(a)
        return q.astype(jnp.float32) * s[..., None]

    arrays_deq = arrays.replace(A={m: deq(a) for m, a in arrays.A.items()},
                                B={m: deq(b) for m, b in arrays.B.items()})
    cand = np.array([[1, 3, 4, 5, 0, 6], [5, 2, 1, 0, 0, 0], [3, 6, 5, 4, 1, 0]], np.int32)
    valid = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], bool)
    n_rocs = np.minimum(np.where(valid, rng.integers(1, 10, cand.shape), 0),
                        np.asarray(arrays.ranks)[cand]) * valid
    kap = np.asarray(kappa(n_rocs, "sqrt"))
    hook = HiLoRAHook(arrays, jnp.asarray(cand), jnp.asarray(valid), jnp.asarray(n_rocs),
                      jnp.asarray(kap)).prepared("packed", pack_weights="int8")
    assert hook.pack is q8
    x = rng.integers(-3, 4, (3, 4, shapes["q_proj"][0])).astype(np.float32)
    for layer in range(2):
        got = jax.jit(lambda h, x, layer=layer: h.deltas(layer, ("q_proj", "v_proj"), x))(hook, x)
        for m, (delta, aux) in zip(("q_proj", "v_proj"), got, strict=True):
            want = _reference_token_stage(arrays_deq, layer, m, x.astype(np.float64), cand, valid,
                                          n_rocs, kap)
            np.testing.assert_array_equal(np.asarray(aux["fired"]), want[1], err_msg=m)
            np.testing.assert_allclose(np.asarray(delta), want[0], rtol=1e-5, atol=1e-4,
                                       err_msg=m)
    # auto weighs an int8 pack's reads at a quarter of a float32 pool's: on a pool large enough
    # that small decode batches gather (the same adapters 12 times), over batches 1..128 it picks
    # the packed path wherever it does with the float pack, and at some batches only then
    k = 12
    big = arrays.replace(A={m: jnp.tile(v, (1, k, 1, 1)) for m, v in arrays.A.items()},
                         B={m: jnp.tile(v, (1, k, 1, 1)) for m, v in arrays.B.items()},
                         scale={m: jnp.tile(v, (1, k, 1)) for m, v in arrays.scale.items()},
                         mask={m: jnp.tile(v, (1, k, 1)) for m, v in arrays.mask.items()},
                         ranks=jnp.tile(arrays.ranks, k), active=jnp.tile(arrays.active, k))
    decisions = (jnp.asarray(cand), jnp.asarray(valid), jnp.asarray(n_rocs), jnp.asarray(kap))
    d_in = shapes["q_proj"][0]
    picks = {w: [HiLoRAHook(big, *decisions).prepared("auto", pack_weights=w)
                 .choose("q_proj", (b, 1, d_in)) == "packed" for b in range(1, 129)]
             for w in (None, "int8")}
    assert not picks[None][0] and picks[None][-1], picks  # both strategies occur
    assert all(q or not f for f, q in zip(picks[None], picks["int8"], strict=True))
    assert sum(picks["int8"]) > sum(picks[None]), picks

