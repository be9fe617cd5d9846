"""hilora_jax.viz: figures carry the expected artists/labels and PNGs are written atomically.

Routings and traces are synthetic but laid out exactly as the routers and `Engine.forward(...,
trace=True)` produce them (hilora `fired [B,T,C]` + `n_module [B,C]`, arrow `coeff [B,T,A]`), so
no model is compiled here; the notebooks test drives the same functions with real traces.
"""

import os

import numpy as np
import pytest
from matplotlib.figure import Figure

from hilora_jax import viz
from hilora_jax.routing.routers import Routing

NAMES = ("math", "code", "news", "chat")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _hilora_routing():
    # prompt 0: math 3 ROCs + code 1; prompt 1: news 4 (second candidate slot invalid)
    info = {"router": "hilora", "cand_idx": np.array([[0, 1], [2, 3]]),
            "cand_valid": np.array([[True, True], [True, False]]),
            "n_rocs": np.array([[3, 1], [4, 0]]), "budget": np.array([4, 4]),
            "cap_binds": np.array([False, False]), "scores": np.zeros((2, 4)),
            "kappa": np.ones(2)}
    return Routing(None, info, NAMES)


def _hilora_trace(layers=2, modules=("q_proj", "v_proj"), T=5):
    tr = {}
    for li in range(layers):
        for m in modules:
            fired = np.zeros((2, T, 2), np.int8)
            fired[0, :, 0], fired[0, :, 1] = 3, 1  # row 0: math fires 3, code 1 per token
            fired[1, :, 0] = 2 + li  # row 1: news fires 2 (layer 0) / 3 (layer 1)
            tr[f"{li}.{m}"] = {"fired": fired, "n_module": np.array([[3, 1], [4, 0]])}
    return tr


def _png_ok(path):
    assert os.path.getsize(path) > 1000
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC
    assert not [p for p in os.listdir(os.path.dirname(path)) if p.endswith(".tmp")]


def _texts(fig):
    out = []
    for ax in fig.axes:
        out += [ax.get_title(), ax.get_xlabel(), ax.get_ylabel()]
        out += [t.get_text() for t in ax.get_xticklabels() + ax.get_yticklabels()]
        out += [t.get_text() for t in ax.texts]
        if ax.get_legend():
            out += [t.get_text() for t in ax.get_legend().get_texts()]
    return out


def test_plot_routing_sequence_level(tmp_path):
    r = _hilora_routing()
    out = tmp_path / "sub" / "routing.png"
    fig = viz.plot_routing(r, prompts=["what is 2+2?", "latest headlines"], save=out)
    assert isinstance(fig, Figure)
    _png_ok(out)
    ax = fig.axes[0]
    # one bar segment per (prompt, used LoRA): math, code for row 0; news for row 1
    widths = sorted(p.get_width() for p in ax.patches if p.get_width() > 0)
    assert widths == [1, 3, 4]
    texts = _texts(fig)
    assert {"math", "code", "news"} <= set(texts) and "chat" not in texts  # legend: used only
    assert "what is 2+2?" in texts and "ROCs allotted (sequence stage)" in texts


def test_plot_routing_with_trace_heatmaps():
    r, tr = _hilora_routing(), _hilora_trace()
    mask = np.ones((2, 5), bool)
    mask[1, :2] = False  # padding must not count
    layers, mods, per_mod, per_lora, unit = viz.trace_usage(r, tr, mask)
    assert layers == [0, 1] and mods == ["q_proj", "v_proj"] and unit == "ROCs fired per token"
    # mean over 8 real tokens: row0 5 tokens x 4 ROCs, row1 3 tokens x (2|3)
    np.testing.assert_allclose(per_mod[:, 0], [(5 * 4 + 3 * 2) / 8, (5 * 4 + 3 * 3) / 8])
    np.testing.assert_allclose(per_lora[0], np.array([15, 5, 6, 0]) / 8 * 2)
    _, _, pm1, pl1, _ = viz.trace_usage(r, tr, mask, row=1)
    np.testing.assert_allclose(pm1[:, 1], [2, 3])
    np.testing.assert_allclose(pl1[:, 2], [4, 6])  # two modules
    fig = viz.plot_routing(r, tr, mask=mask)
    assert len([a for a in fig.axes if a.images]) == 2  # layers x modules, layers x LoRAs
    texts = _texts(fig)
    assert "layer 1" in texts and "v_proj" in texts and "chat" in texts


def test_trace_usage_trimmed_candidate_slots():
    """HiLoRA's router passes only the first C candidate slots that hold ROCs to the token stage
    (`fired [B, T, C]`, C < the info's slots): usage still lands on each slot's LoRA."""
    info = {"router": "hilora", "cand_idx": np.array([[0, 1, 3], [2, 3, 0]]),
            "cand_valid": np.array([[True, True, False], [True, True, False]]),
            "n_rocs": np.array([[3, 1, 0], [4, 0, 0]])}
    r = Routing(None, info, NAMES)
    fired = np.zeros((2, 5, 2), np.int8)
    fired[0, :, 0], fired[0, :, 1], fired[1, :, 0] = 3, 1, 4
    _, _, per_mod, per_lora, _ = viz.trace_usage(r, {"0.q_proj": {"fired": fired}})
    np.testing.assert_allclose(per_lora[0], [3 / 2, 1 / 2, 4 / 2, 0])  # math, code, news
    np.testing.assert_allclose(per_mod, [[4.0]])


def test_plot_routing_token_level_router_uses_trace(tmp_path):
    coeff = np.zeros((3, 4, 4), np.float32)
    coeff[:, :, 1] = 0.7
    coeff[:, :, 3] = 0.3
    tr = {"0.q_proj": {"coeff": coeff}, "1.q_proj": {"coeff": coeff}}
    r = Routing(None, {"router": "arrow"}, NAMES)
    fig = viz.plot_routing(r, tr, save=tmp_path / "arrow.png")
    _png_ok(tmp_path / "arrow.png")
    _, _, per_mod, per_lora, unit = viz.trace_usage(r, tr)
    assert unit == "LoRAs mixed per token"
    np.testing.assert_allclose(per_mod, [[2.0], [2.0]])
    np.testing.assert_allclose(per_lora[0], [0, 1, 0, 1])
    assert len(fig.axes[0].patches) == 3 * 2  # 3 prompts x 2 used LoRAs
    # without a trace there is nothing sequence-level to draw, but it still renders
    fig2 = viz.plot_routing(r)
    assert any("no sequence-level" in t for t in _texts(fig2))


def test_plot_routing_weights_router():
    w = np.array([[0.5, 0.5, 0, 0], [0, 0, 0, 1.0]], np.float32)
    r = Routing(None, {"router": "retrieval", "weights": w}, NAMES)
    fig = viz.plot_routing(r)
    assert sorted(w for p in fig.axes[0].patches if (w := p.get_width()) > 0) == [0.5, 0.5, 1.0]
    assert "adapter weight" in _texts(fig)


def _result(acc, protocol):
    return {"config": {"protocol": protocol}, "mean": {"acc": acc, "acc_norm": acc / 2}}


def test_plot_results_grouped_bars(tmp_path):
    res = {"base": {"seen": _result(0.25, "seen"), "unseen-cross": _result(0.25, "unseen-cross")},
           "hilora": {"seen": _result(0.75, "seen"), "unseen-cross": _result(0.5, "unseen-cross")},
           "arrow": {"seen": _result(0.5, "seen")}}
    fig = viz.plot_results(res, save=tmp_path / "res.png")
    _png_ok(tmp_path / "res.png")
    ax = fig.axes[0]
    heights = [p.get_height() for p in ax.patches]
    assert len(heights) == 6 and np.isnan(heights).sum() == 1  # arrow has no unseen-cross
    assert sorted(h for h in heights if not np.isnan(h)) == [0.25, 0.25, 0.5, 0.5, 0.75]
    texts = _texts(fig)
    assert {"base", "hilora", "arrow", "seen", "unseen-cross", "0.75", "acc"} <= set(texts)
    # flat {(method, protocol): result} and a different metric give the same layout
    flat = {(m, p): r for m, d in res.items() for p, r in d.items()}
    fig2 = viz.plot_results(flat, metric="acc_norm")
    assert max(p.get_height() for p in fig2.axes[0].patches if not np.isnan(p.get_height())) == 0.375


def test_routing_heatmap_and_fractions(tmp_path):
    r = _hilora_routing()
    m, rows, cols = viz.routing_fractions(r, ["t_math", "t_news"])
    np.testing.assert_array_equal(m, [[1, 1, 0, 0], [0, 0, 1, 0]])
    assert rows == ["t_math", "t_news"] and cols == list(NAMES)
    fig = viz.plot_routing_heatmap(m, rows, cols, save=tmp_path / "heat.png")
    _png_ok(tmp_path / "heat.png")
    ax = fig.axes[0]
    assert ax.images and ax.images[0].get_array().shape == (2, 4)
    texts = _texts(fig)
    assert {"t_math", "t_news", "chat", "LoRA", "task", "1.00"} <= set(texts)
    with pytest.raises(ValueError, match="does not match"):
        viz.plot_routing_heatmap(m, rows[:1], cols)
    with pytest.raises(ValueError, match="task labels"):
        viz.routing_fractions(r, ["only one"])


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    fig = viz.plot_routing_heatmap(np.eye(2), ["a", "b"], ["x", "y"])

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(fig, "savefig", boom)
    with pytest.raises(RuntimeError):
        viz.save_png(fig, tmp_path / "x.png")
    assert os.listdir(tmp_path) == []


def test_plot_training_curves(tmp_path):
    fig = viz.plot_training_curves({"a": [2.0, 1.0, 0.5], "b": [3.0, 2.5]}, save=tmp_path / "l.png")
    _png_ok(tmp_path / "l.png")
    lines = fig.axes[0].get_lines()
    assert [len(line.get_xdata()) for line in lines] == [3, 2]
    assert {"a", "b", "step"} <= set(_texts(fig))
