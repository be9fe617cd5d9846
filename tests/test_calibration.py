"""Calibrated HiLoRA sequence stage (issue 13): leave-one-out calibration, the adaptive candidate
set and allocation, effective-count kappa, PCA on active adapters. Parity with the float64
reference (tests/reference_hilora.py) and properties of the rule."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
import reference_hilora as ref
from hf_utils import make_hf_model, padded_batch
from routing_utils import random_pool

from hilora_jax.inference import Engine
from hilora_jax.io.loading import load_model
from hilora_jax.routing import build_router
from hilora_jax.routing.gaussian import (
    GaussianBank,
    calibrated_scores,
    fit_gaussians,
    log_likelihood,
    scores,
)
from hilora_jax.routing.sequence import calibrated_decisions, sequence_decisions
from hilora_jax.routing.token import KAPPA_MODES, kappa


def _samples(rng, a, e, m_range=(3, 25), spread=2.0):
    out = []
    for _ in range(a):
        m = int(rng.integers(*m_range))
        scale = rng.uniform(0.3, 3.0, size=e)
        out.append(rng.normal(size=(m, e)) * scale + rng.normal(size=e) * spread)
    return out


# ----------------------------------------------------------------------------- calibration


@pytest.mark.parametrize("estimator", ["ledoit_wolf", "ridge", "diag", "pca"])
def test_loo_calibration_matches_reference(estimator):
    for seed, (a, e) in enumerate([(4, 16), (3, 40), (5, 7)]):
        rng = np.random.default_rng(200 + seed)
        xs = _samples(rng, a, e)
        bank = fit_gaussians(xs, estimator, calibrate=True)
        model = ref.fit(xs, estimator, calibrate=True)
        np.testing.assert_allclose(bank.cal_loc, model["cal_loc"], rtol=1e-5)
        np.testing.assert_allclose(bank.cal_scale, model["cal_scale"], rtol=1e-5)
        assert (np.asarray(bank.cal_scale) > 0).all()
        z = np.concatenate([rng.normal(size=(5, e)) * 2, xs[0][:2], xs[-1][:1] + 0.1])
        got = np.asarray(jax.jit(calibrated_scores)(bank, z))
        want = ref.calibrated_scores(model, z)
        # |c| can be large for far inputs: compare relative to the raw log-likelihood scale
        np.testing.assert_allclose(got * np.asarray(bank.cal_scale), want * model["cal_scale"],
                                   rtol=1e-4, atol=1e-3)


def test_calibration_meaning_and_bank_roundtrip(tmp_path):
    """A LoRA's own held-out-like inputs score around 0; others far below; stored with the bank."""
    rng = np.random.default_rng(3)
    e, m = 24, 40
    centres = rng.normal(size=(3, e)) * 4
    xs = [c + rng.normal(size=(m, e)) for c in centres]
    bank = fit_gaussians(xs, calibrate=True)
    fresh = np.concatenate([c + rng.normal(size=(200, e)) for c in centres])
    cal = np.asarray(calibrated_scores(bank, fresh)).reshape(3, 200, 3)
    for i in range(3):
        own = cal[i, :, i]
        assert abs(np.median(own)) < 1.0  # as typical as its own held-out samples
        assert (np.delete(cal[i], i, axis=1) < -10).all()  # other LoRAs: far below
    np.savez(tmp_path / "bank.npz", **bank.to_dict())
    loaded = GaussianBank.from_dict(dict(np.load(tmp_path / "bank.npz")))
    assert loaded.calibrated
    np.testing.assert_array_equal(calibrated_scores(loaded, fresh[:5]),
                                  calibrated_scores(bank, fresh[:5]))
    d = bank.to_dict()
    d.pop("cal_scale")
    with pytest.raises(ValueError, match="cal_loc and cal_scale"):
        GaussianBank.from_dict(d)
    with pytest.raises(ValueError, match="no calibration"):
        calibrated_scores(fit_gaussians(xs), fresh[:2])


def test_calibration_errors_name_the_adapter():
    rng = np.random.default_rng(0)
    good = rng.normal(size=(6, 5))
    with pytest.raises(ValueError, match=r"adapter 1 \('b'\).*at least 3 samples"):
        fit_gaussians([good, good[:2]], names=["a", "b"], calibrate=True)
    fit_gaussians([good, good[:2]])  # without calibration two samples are enough
    with pytest.raises(ValueError, match="basis_from"):
        fit_gaussians([good, good], "pca", basis_from=[False, False])


# ----------------------------------------------------------------------------- calibrated rule


def _dec_row(dec, b):
    v = np.asarray(dec.cand_valid[b])
    return (np.asarray(dec.cand_idx[b])[v].tolist(), np.asarray(dec.n_rocs[b])[v].tolist(),
            int(dec.budget[b]), int(dec.n_selected[b]), bool(dec.cap_binds[b]))


@pytest.mark.parametrize("allocation", ["relative", "budget"])
@pytest.mark.parametrize("cfg", [dict(), dict(floor=-1.0, margin=0.5, tau=0.5, max_candidates=3),
                                 dict(floor=-6.0, margin=10.0, full_at=1.0, tau=2.0)])
def test_calibrated_decisions_match_reference_exactly(allocation, cfg):
    rng = np.random.default_rng(11)
    b, a = 400, 7
    cal = rng.normal(size=(b, a)) * 3 - 1
    cal[::7, 2] = cal[::7, 4]  # ties: lower index first
    cal[::11, 1] = -np.inf  # a non-finite score is never a candidate
    cal[5] = -50.0  # far from every LoRA
    cal = cal.astype(np.float32)
    ranks = np.array([8, 4, 16, 2, 8, 8, 32], np.int32)
    active = rng.random((b, a)) > 0.15
    fn = jax.jit(functools.partial(calibrated_decisions, allocation=allocation, **cfg))
    dec = fn(cal, ranks, active)
    for row in range(b):
        want = ref.calibrated_decision(cal[row].astype(np.float64), ranks, active[row],
                                       allocation=allocation, **cfg)
        got = _dec_row(dec, row)
        assert got == (want["cand"], want["n"], want["budget"], want["n_selected"],
                       want["cap_binds"]), row
        np.testing.assert_allclose(float(dec.coverage[row]), want["coverage"], atol=1e-6)
    assert _dec_row(dec, 5)[:3] == ([], [], 0)
    # vmappable: one row at a time gives the same decisions
    one = jax.vmap(lambda c, act: fn(c[None], ranks, act[None]))(cal[:9], active[:9])
    np.testing.assert_array_equal(np.asarray(one.n_rocs)[:, 0], np.asarray(dec.n_rocs)[:9])


def test_router_calibrated_matches_reference_end_to_end(tiny):
    _, model, _ = tiny
    pool, emb, _ = random_pool(model.config, seed=21)
    router = build_router("hilora", pool, options=dict(embedder=emb, preset="calibrated"))
    texts = ["task0 q1", "task3 q2", "task1 q1", "far away text", "task4 q0", "task2 s3"]
    info = router.route(texts).info
    fits = ref.fit([emb(list(pool.samples[n])) for n in pool.names], calibrate=True)
    cal = ref.calibrated_scores(fits, emb(texts))
    for b in range(len(texts)):
        d = ref.calibrated_decision(cal[b], np.asarray(pool.arrays.ranks), np.ones(len(pool), bool))
        c = len(d["cand"])
        assert info["cand_idx"][b][:c].tolist() == d["cand"]
        assert not info["cand_valid"][b][c:].any()
        assert info["n_rocs"][b][:c].tolist() == d["n"]
        assert info["budget"][b] == d["budget"]
        assert info["kappa"][b] == pytest.approx(ref.kappa(d["n"], "sqrt-eff"), rel=1e-6)
    assert info["budget"][3] == 0  # the far input gets no LoRA capacity


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("m")
    make_hf_model(d, "llama", vocab_size=64, intermediate_size=64)
    model = load_model(d, progress=False)
    return d, model, Engine(model)


def test_own_sample_is_a_candidate_and_typical_input_gets_its_full_rank(tiny):
    _, model, eng = tiny
    pool, emb, _ = random_pool(model.config, seed=22, ranks=(4, 8, 6, 8, 2), spread=6.0)
    router = build_router("hilora", pool, options=dict(embedder=emb, preset="calibrated"))
    ranks = np.asarray(pool.arrays.ranks)
    for i, name in enumerate(pool.names):
        info = router.route(list(pool.samples[name])).info
        own = (info["cand_idx"] == i) & info["cand_valid"]
        assert own.any(1).all(), name  # every own sample: its LoRA is a candidate
    # fresh inputs typical of exactly one LoRA: one candidate, that LoRA's full rank, kappa 1
    texts = [f"task{i} q{j}" for i in range(len(pool)) for j in range(20)]
    info = router.route(texts).info
    truth = np.repeat(np.arange(len(pool)), 20)
    n_cand = info["cand_valid"].sum(1)
    assert np.mean(n_cand == 1) >= 0.9 and n_cand.max() <= 2
    routed = n_cand > 0  # a rare fresh input below the floor (chi-square tail) gets none
    assert routed.mean() >= 0.95
    assert (info["cand_idx"][routed, 0] == truth[routed]).all()
    typical = info["cal_scores"][np.arange(len(texts)), truth] >= 0
    assert typical.sum() >= 30
    np.testing.assert_array_equal(info["n_rocs"][typical, 0], ranks[truth[typical]])
    single = typical & (n_cand == 1)
    np.testing.assert_allclose(info["kappa"][single], 1.0)
    # ... so the routed output equals that LoRA alone (oracle) for such an input
    k = int(np.flatnonzero(single)[0])
    r = router.route([texts[k]])
    o = build_router("oracle", pool).route([texts[k]], adapter_names=[pool.names[truth[k]]])
    ids, mask = padded_batch(np.random.default_rng(0), (6,), 6, vocab=64)
    a = np.asarray(eng.forward(ids, mask, lora=r.hook))
    b = np.asarray(eng.forward(ids, mask, lora=o.hook))
    assert np.abs(a - b).max() <= 1e-5


def test_input_far_from_all_gets_no_capacity(tiny):
    _, model, eng = tiny
    pool, emb, _ = random_pool(model.config, seed=23)
    router = build_router("hilora", pool, options=dict(embedder=emb, preset="calibrated"))
    texts = ["far away text", "nothing like it", "zzz"]
    r = router.route(texts)
    assert (r.info["budget"] == 0).all() and not r.info["cand_valid"].any()
    assert (r.info["coverage"] == 0).all()
    assert "none (base model)" in r.describe(0)
    ids, mask = padded_batch(np.random.default_rng(0), (5, 5, 5), 5, vocab=64)
    np.testing.assert_allclose(np.asarray(eng.forward(ids, mask, lora=r.hook)),
                               np.asarray(eng.forward(ids, mask)), atol=1e-5)
    # the paper's rule, for contrast, mixes k >= 3 LoRAs into the same inputs
    paper = build_router("hilora", pool, options=dict(embedder=emb, preset="raw")).route(texts)
    assert (paper.info["cand_valid"].sum(1) >= 3).all()


def _with_copy(pool, name, new):
    """The pool plus a copy of adapter `name` (same arrays, same samples) named `new`."""
    from hilora_jax.lora.pool import LoraPool, PoolArrays, _to_device

    idx = list(range(len(pool))) + [pool.index(name)]
    a = pool.arrays
    take = lambda d: {m: np.asarray(v)[:, idx] for m, v in d.items()}
    arr = PoolArrays(A=take(a.A), B=take(a.B), scale=take(a.scale), mask=take(a.mask),
                     ranks=np.asarray(a.ranks)[idx], active=np.asarray(a.active)[idx])
    return LoraPool(_to_device(arr, np.float32, None), list(pool.names) + [new],
                    clusters={**pool.clusters, new: pool.clusters[name]},
                    samples={**pool.samples, new: pool.samples[name]})


@pytest.mark.parametrize("estimator", ["ledoit_wolf", "diag", "pca"])
def test_duplicated_lora_does_not_change_other_decisions(tiny, estimator):
    _, model, _ = tiny
    pool, emb, _ = random_pool(model.config, seed=24, spread=2.0)  # overlapping clusters
    dup = 2
    bigger = _with_copy(pool, pool.names[dup], "copy")
    names = list(bigger.names)
    opts = dict(embedder=emb, preset="calibrated", estimator=estimator, max_candidates=16)
    r0 = build_router("hilora", pool, options=opts)
    r1 = build_router("hilora", bigger, options=opts)
    texts = [f"task{i} q{j}" for i in range(len(pool)) for j in range(15)] + ["far away text"]
    a, b = r0.route(texts).info, r1.route(texts).info
    moved = 0
    for row in range(len(texts)):
        da = {names[i]: n for i, v, n in zip(a["cand_idx"][row], a["cand_valid"][row],
                                             a["n_rocs"][row], strict=True) if v}
        db = {}
        for i, v, n in zip(b["cand_idx"][row], b["cand_valid"][row], b["n_rocs"][row], strict=True):
            if v and i != len(pool):  # the copy itself
                db[names[i]] = n
        assert da == db, (row, da, db)
        moved += pool.names[dup] in da
    assert moved > 0, "some inputs should route to the duplicated LoRA"
    # under the paper's rule a duplicate does move other decisions (ceil|max s| and the softmax)
    p0 = build_router("hilora", pool, options=dict(embedder=emb, preset="raw"))
    p1 = build_router("hilora", bigger, options=dict(embedder=emb, preset="raw"))
    pa, pb = p0.route(texts).info, p1.route(texts).info
    assert (pa["budget"] != pb["budget"]).any() or (pa["n_rocs"][:, 0] != pb["n_rocs"][:, 0]).any()


def test_pca_basis_uses_active_adapters_only(tiny):
    _, model, _ = tiny
    pool, emb, _ = random_pool(model.config, seed=25)
    held = 1
    active = np.ones(len(pool), bool)
    active[held] = False
    opts = dict(embedder=emb, preset="calibrated", estimator="pca")
    router = build_router("hilora", pool, options=opts)
    texts = [f"task{i} q3" for i in range(len(pool))]
    info = router.route(texts, active=active).info
    # the same decisions from a bank fitted on the active adapters' samples only
    xs = [emb(list(pool.samples[n])) for n in pool.names]
    bank = fit_gaussians(xs, "pca", calibrate=True, basis_from=active)
    want = ref.fit(xs, "pca", calibrate=True, basis_from=active)
    np.testing.assert_allclose(np.asarray(log_likelihood(bank, emb(texts))),
                               ref.log_likelihood(want, emb(texts)), rtol=1e-4)
    dec = calibrated_decisions(calibrated_scores(bank, emb(texts)), pool.arrays.ranks, active)
    np.testing.assert_array_equal(info["n_rocs"], np.asarray(dec.n_rocs))
    np.testing.assert_array_equal(info["cand_idx"], np.asarray(dec.cand_idx))
    assert not ((info["cand_idx"] == held) & info["cand_valid"]).any()
    full = fit_gaussians(xs, "pca", calibrate=True)
    assert not np.allclose(np.asarray(full.proj), np.asarray(bank.proj))


# ----------------------------------------------------------------------------- presets, kappa


def test_paper_and_raw_presets_keep_the_old_rule(tiny):
    _, model, _ = tiny
    pool, emb, _ = random_pool(model.config, seed=26)
    texts = ["task0 q1", "task3 q2", "far away text", "task4 q0"]
    z = emb(texts)
    fits = ref.fit([emb(list(pool.samples[n])) for n in pool.names])
    s = ref.log_likelihood(fits, z) / z.shape[1]
    raw = build_router("hilora", pool, options=dict(embedder=emb, preset="raw")).route(texts)
    for b in range(len(texts)):
        d = ref.sequence_decision(s[b], np.asarray(pool.arrays.ranks), np.ones(len(pool), bool))
        assert raw.info["cand_idx"][b][: len(d["cand"])].tolist() == d["cand"]
        assert raw.info["n_rocs"][b][: len(d["cand"])].tolist() == d["n"]
        assert raw.info["kappa"][b] == pytest.approx(ref.kappa(d["n"], "sqrt"))
    # paper = the raw rule with sampled allocation, keyed per text exactly as before
    paper = build_router("hilora", pool, options=dict(embedder=emb, preset="paper", seed=5))
    info = paper.route(texts).info
    import zlib

    keys = jax.numpy.stack([jax.random.fold_in(jax.random.key(5), zlib.crc32(t.encode()) & 0x7FFFFFFF)
                            for t in texts])
    bank = fit_gaussians([emb(list(pool.samples[n])) for n in pool.names])
    dec = sequence_decisions(scores(bank, z), pool.arrays.ranks, pool.arrays.active,
                             mode="sample", key=keys)
    for f in ("cand_idx", "cand_valid", "n_rocs", "budget"):
        np.testing.assert_array_equal(info[f], np.asarray(getattr(dec, f)))
    assert "cal_scores" in info  # diagnostics only: the decisions above ignore them


def test_kappa_effective_count():
    n = np.array([[8, 0, 0], [4, 4, 0], [8, 1, 0], [3, 3, 3], [0, 0, 0]], np.int32)
    for mode in KAPPA_MODES:
        got = np.asarray(jax.jit(kappa, static_argnames="mode")(n, mode=mode))
        np.testing.assert_allclose(got, [ref.kappa(row, mode) for row in n.tolist()], rtol=1e-6)
    eff = np.asarray(kappa(n, "sqrt-eff"))
    np.testing.assert_allclose(eff[[0, 1, 3, 4]], [1.0, 2**-0.5, 3**-0.5, 1.0], rtol=1e-6)
    assert eff[2] > 0.85  # a decisive expert (8 vs 1 ROCs) is barely shrunk; sqrt gives 0.71
    assert float(kappa(n, "sqrt")[2]) == pytest.approx(2**-0.5)


def test_bad_calibrated_options(tiny):
    _, model, _ = tiny
    pool, emb, _ = random_pool(model.config, seed=27)
    with pytest.raises(ValueError, match="floor < full_at"):
        build_router("hilora", pool, options=dict(embedder=emb, preset="calibrated", floor=1.0))
    with pytest.raises(ValueError, match="allocation"):
        build_router("hilora", pool, options=dict(embedder=emb, allocation="greedy"))
    with pytest.raises(ValueError, match="rule"):
        build_router("hilora", pool, options=dict(embedder=emb, rule="magic"))
    with pytest.raises(ValueError, match="margin"):
        calibrated_decisions(np.zeros((1, 3)), np.ones(3, np.int32), np.ones(3, bool), margin=-1)
    few = pool.subset(np.ones(len(pool), bool))
    few.samples = {**few.samples, "lora3": few.samples["lora3"][:2]}
    with pytest.raises(ValueError, match=r"lora3.*at least 3 samples"):
        build_router("hilora", few, options=dict(embedder=emb, preset="calibrated"))
    # the paper rule still works with 2 samples (no calibration diagnostics then)
    info = build_router("hilora", few, options=dict(embedder=emb, preset="raw")).route(["task0 q0"]).info
    assert "cal_scores" not in info


def test_calibration_plot(tmp_path):
    from hilora_jax.viz import calibration_matrix, plot_calibration

    rng = np.random.default_rng(0)
    own = np.repeat(np.arange(3), 10)
    cal = rng.normal(size=(30, 3)) - 20.0
    cal[np.arange(30), own] = rng.normal(size=30)
    m = calibration_matrix(cal, own)
    off = m.copy()
    np.fill_diagonal(off, -np.inf)
    assert m.shape == (3, 3) and (np.diag(m) > off.max(1)).all()
    np.testing.assert_allclose(m[1, 2], np.median(cal[own == 1, 2]))
    plot_calibration(cal, own, ["a", "b", "c"], save=tmp_path / "cal.png")
    assert (tmp_path / "cal.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="names"):
        plot_calibration(cal, own, ["a"])


def test_runner_records_candidate_sizes_cap_and_own_share(tiny):
    from eval_utils import mc_examples, word_tokenizer

    from hilora_jax.eval.runner import evaluate

    _, model, eng = tiny
    pool, emb, _ = random_pool(model.config, seed=21)
    exs, tok = mc_examples(), word_tokenizer()
    res = {}
    for preset in ("raw", "calibrated"):
        router = build_router("hilora", pool, options=dict(embedder=emb, preset=preset,
                                                           max_candidates=2))
        res[preset] = evaluate(eng, tok, pool, router, exs, batch_size=8, progress=False)
        rt = res[preset]["routing"]
        hist = rt["candidates_hist"]
        assert sum(hist.values()) == len(exs)
        assert rt["mean_candidates"] == pytest.approx(
            np.mean([t["mean_candidates"] for t in res[preset]["tasks"].values()]))
        for t in res[preset]["tasks"].values():
            assert 0.0 <= t["own_roc_share"] <= 1.0 and 0.0 <= t["cap_binds"] <= 1.0
            assert sum(t["candidates_hist"].values()) == t["n"]
    # the raw rule picks >= k = 3 candidates, so a cap of 2 always binds; the calibrated rule
    # picks the own LoRA alone for these well-separated tasks and gives it every ROC
    assert res["raw"]["routing"]["cap_binds"] == 1.0
    assert res["calibrated"]["routing"]["cap_binds"] == 0.0
    assert res["calibrated"]["routing"]["own_roc_share"] > res["raw"]["routing"]["own_roc_share"]
    assert res["calibrated"]["routing"]["own_roc_share"] >= 0.9
