"""benchmarks/realistic_pool: the recipe generator (deterministic, heterogeneous), the shortlist
order, the dev selection rule, and reading a saved heterogeneous adapter back as the trainer's
hook (equal outputs)."""

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rp():
    name = "hilora_bench_realistic_pool_run"
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks/realistic_pool/run.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


TASKS = [f"task{i}" for i in range(40)]


def test_recipes_are_deterministic_and_per_task(rp):
    a = {t: rp.recipe_for(t, seed=0) for t in TASKS}
    b = {t: rp.recipe_for(t, seed=0) for t in reversed(TASKS)}  # order does not matter
    assert a == b
    assert any(rp.recipe_for(t, seed=1) != a[t] for t in TASKS)  # the seed does


def test_recipes_are_heterogeneous(rp):
    recs = [rp.recipe_for(t) for t in TASKS]
    assert {r["r"] for r in recs} == set(rp.RANKS)
    assert {r["targets"] for r in recs} == {"qv", "all-linear"}
    assert any(r["use_rslora"] for r in recs) and not all(r["use_rslora"] for r in recs)
    assert {"r", "2r", "16", "32"} <= {
        "r" if r["alpha"] == r["r"] else "2r" if r["alpha"] == 2 * r["r"] else f"{r['alpha']:g}"
        for r in recs}
    assert any("rank_pattern" in r for r in recs)
    for r in recs:
        assert r["r"] in rp.RANKS and r["alpha"] in (r["r"], 2 * r["r"], 16, 32)
        for mod, r2 in r.get("rank_pattern", {}).items():
            assert r2 != r["r"] and r["alpha_pattern"][mod] == 2 * r2
            assert mod in (("v_proj",) if r["targets"] == "qv" else ("down_proj", "up_proj", "o_proj"))


def test_recipe_lr_normalises_the_scale(rp):
    rec = {"r": 8, "alpha": 16.0, "targets": "qv", "use_rslora": False}
    assert rp.recipe_scale(rec) == 2.0 and rp.recipe_lr(rec, 1e-3) == pytest.approx(1e-3)
    rs = {**rec, "use_rslora": True}
    assert rp.recipe_scale(rs) == pytest.approx(16 / math.sqrt(8))
    assert rp.recipe_lr(rs, 1e-3) == pytest.approx(1e-3 * 2 / (16 / math.sqrt(8)))
    assert rp.recipe_lr({**rec, "alpha": 4.0}, 1e-3) == pytest.approx(2e-3)  # clipped at 2x
    assert rp.recipe_lr({**rec, "alpha": 256.0}, 1e-3) == pytest.approx(2.5e-4)  # and 0.25x


def test_shortlist_takes_top_gain_round_robin_over_clusters(rp):
    screen = [{"task": "a1", "cluster": "A", "gain": 0.9}, {"task": "a2", "cluster": "A", "gain": 0.8},
              {"task": "a3", "cluster": "A", "gain": 0.7}, {"task": "b1", "cluster": "B", "gain": 0.5},
              {"task": "c1", "cluster": "C", "gain": 0.4}, {"task": "c2", "cluster": "C", "gain": 0.1},
              {"task": "gone", "cluster": "C", "gain": 1.0}]
    cands = {"a1", "a2", "a3", "b1", "c1", "c2"}
    got = [s["task"] for s in rp.shortlist(screen, cands, 5)]
    assert got == ["a1", "b1", "c1", "a2", "a3"]  # c2 (lowest gain) cut, "gone" not a candidate


def test_selection_needs_gain_and_standard_errors(rp):
    rows = [{"task": "x", "gain": 0.30, "se": 0.05}, {"task": "y", "gain": 0.12, "se": 0.08},
            {"task": "z", "gain": 0.05, "se": 0.01}, {"task": "w"}]
    assert [r["task"] for r in rp.select(rows, 0.10, 2.0)] == ["x"]
    assert [r["task"] for r in rp.select(rows, 0.0, 2.0)] == ["x", "z"]


def test_saved_heterogeneous_adapter_reads_back_as_the_same_hook(rp, tmp_path):
    """`load_trained` (PEFT dir -> trainer hook, used by the dev screen) gives the trained
    adapter's outputs exactly, for an all-linear rsLoRA adapter with a rank_pattern."""
    from hf_utils import make_hf_model
    from test_eval_metrics import CharTok
    from test_train import toy_examples

    from hilora_jax.inference import Engine
    from hilora_jax.io.loading import load_model
    from hilora_jax.lora.train import save_peft, train_lora

    path = tmp_path / "llama"
    make_hf_model(path, "llama", kv_heads=2)
    model = load_model(path, progress=False)
    tr = train_lora(model, CharTok(), toy_examples(), r=4, alpha=8, targets="all-linear",
                    use_rslora=True, rank_pattern={"up_proj": 2}, alpha_pattern={"up_proj": 4.0},
                    steps=5, lr=5e-2, batch_size=4, progress=False)
    out = save_peft(tr, tmp_path / "ad", str(path))
    back = rp.load_trained(out, model)
    assert set(back.a) == set(tr.targets) and back.layers is None
    for m in tr.targets:
        assert back.scale_of(m) == pytest.approx(tr.adapter.scale_of(m))
        np.testing.assert_array_equal(np.asarray(back.b[m]), np.asarray(tr.adapter.b[m]))
    ids = np.random.default_rng(0).integers(3, 61, size=(2, 9))
    mask = np.ones_like(ids)
    eng = Engine(model)
    np.testing.assert_allclose(np.asarray(eng.forward(ids, mask, lora=back)),
                               np.asarray(eng.forward(ids, mask, lora=tr.adapter)), atol=1e-6)
    assert np.abs(np.asarray(eng.forward(ids, mask, lora=back))
                  - np.asarray(eng.forward(ids, mask))).max() > 1e-3


def test_dg_tables_render_paired_rows(rp):
    paired = {"seen": {"uniform": {"diff": 0.1, "se": 0.02, "n": 10},
                       "base": {"diff": 0.3, "se": 0.05, "n": 10}}}
    lines = rp.dg.paired_table(paired)
    assert lines[2] == "| protocol | base | uniform |"
    assert lines[4] == "| seen | +0.300 +- 0.050 | +0.100 +- 0.020 |"


def test_goal_checks_read_the_issue_criteria(rp):
    res = {("hilora", "seen"): {"mean": {"acc": 0.58}, "routing": {"mean_candidates": 2.5}},
           ("oracle", "seen"): {"mean": {"acc": 0.60}}}
    paired = {"seen": {"arrow": {"diff": 0.05, "se": 0.02}, "uniform": {"diff": 0.03, "se": 0.02}},
              "unseen-cross": {"base": {"diff": -0.03, "se": 0.02}}}
    got = {c["goal"]: c["met"] for c in rp.goal_checks(res, paired)}
    assert got == {"hilora seen >= 0.95x oracle": True,  # 0.967x
                   "hilora above arrow in seen by >= 2 SE": True,
                   "hilora above uniform in seen by >= 2 SE": False,
                   "do no harm: hilora not below base in unseen-cross by > 1 SE": False,
                   "hilora mean candidate-set size for seen inputs <= 3": True}


def test_choose_rule_takes_the_best_mean_over_protocols_ties_to_the_first(rp):
    protos = ["seen", "unseen-within"]
    acc = {("hilora", "seen"): 0.6, ("hilora", "unseen-within"): 0.4,      # mean 0.50
           ("hilora-cal", "seen"): 0.7, ("hilora-cal", "unseen-within"): 0.3,  # mean 0.50
           ("hilora-f5", "seen"): 0.5, ("hilora-f5", "unseen-within"): 0.45}   # mean 0.475
    res = {k: {"mean": {"acc": v}} for k, v in acc.items()}
    best, score = rp.choose_rule(res, ["hilora", "hilora-cal", "hilora-f5"], protos)
    assert best == "hilora" and score["hilora-f5"] == pytest.approx(0.475)
    best, _ = rp.choose_rule(res, ["hilora-cal", "hilora", "hilora-f5"], protos)
    assert best == "hilora-cal"  # the tie goes to the earlier label
    res[("hilora-f5", "seen")] = {"mean": {"acc": 0.9}}
    assert rp.choose_rule(res, ["hilora", "hilora-cal", "hilora-f5"], protos)[0] == "hilora-f5"


def test_stages_are_gated_and_freeze_records_the_dev_choice(rp, tmp_path):
    """--dev-routing needs the selection, --freeze the dev routing results, --test frozen.json;
    the frozen `hilora` is the rule chosen on dev, with its options, and the other rules stay
    as labelled variants."""
    import json

    res = tmp_path / "res"
    res.mkdir()
    args = ["--results", str(res), "--out", str(tmp_path / "out")]
    for stage, missing in (("--dev-routing", "selection.json"), ("--freeze", "selection.json"),
                           ("--test", "frozen.json")):
        with pytest.raises(SystemExit, match=missing):
            rp.main(args + [stage])
    ad = tmp_path / "ad"
    ad.mkdir()
    (ad / "adapter_config.json").write_text("{}")
    sel = {"selected_at": "t", "selection": {"rule": "r"}, "seed": 0, "model": "smollm2",
           "splits": {}, "train": {}, "tasks": [{"task": "a", "cluster": "A", "adapter": str(ad)}]}
    (res / "selection.json").write_text(json.dumps(sel))
    with pytest.raises(SystemExit, match="dev_routing.json"):
        rp.main(args + ["--freeze"])
    runs = [["hilora", "hilora", {}], ["hilora-cal", "hilora", {"preset": "calibrated"}]]
    (res / "dev_routing.json").write_text(json.dumps(
        {"runs": runs, "choice": {"rule": "r", "best": "hilora-cal",
                                  "scores": {"hilora": 0.4, "hilora-cal": 0.5}}}))
    assert rp.main(args + ["--freeze", "--dev-variant", "hilora-cal=hilora:preset=calibrated",
                           "--dev-variant", "hilora-p=hilora:preset=paper"]) == 0
    fr = json.loads((res / "frozen.json").read_text())
    assert fr["hilora"]["chosen_on_dev"] == "hilora-cal"
    assert fr["hilora"]["options"] == {"preset": "calibrated"}
    assert "hilora-p=hilora:preset=paper" in fr["variants"]
    assert "hilora-default=hilora" in fr["variants"]
    assert not any(v.startswith("hilora-cal=") for v in fr["variants"])
    (ad / "adapter_config.json").unlink()
    with pytest.raises(SystemExit, match="missing"):
        rp.main(args + ["--test"])
