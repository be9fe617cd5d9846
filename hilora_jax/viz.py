"""Plots of routing decisions and evaluation results (matplotlib, headless-safe).

Every function builds a standalone `matplotlib.figure.Figure` (never `pyplot`: no global figure
state, no GUI backend, nothing shown twice in notebooks) and returns it. Pass `save="x.png"` to
also write a PNG atomically (temp file in the same folder, then `os.replace`), so a crashed run
never leaves a truncated image behind. In Jupyter a returned figure renders inline under
`%matplotlib inline`; `IPython.display.display(fig)` shows it explicitly.

* `plot_routing(routing, trace=None, mask=None)`: which LoRAs each prompt used and how much
  (ROCs allotted for `hilora`, adapter weights for mixture routers), and with a routing trace from
  `Engine.forward(..., trace=True)` the token-level usage per layer x module and per layer x LoRA
  (a `T5Engine.forward` trace: one row per encoder block, then per decoder block).
* `plot_results(results)`: accuracy by method and protocol (grouped bars) from `evaluate` results.
* `plot_routing_heatmap(matrix, row_labels, col_labels)`: a task x LoRA routing heatmap; build the
  matrix with `routing_fractions(routing, tasks)`.
* `plot_training_curves({name: losses})`: loss curves of `lora.train.train_lora` runs.
* `trace_usage(routing, trace, mask=None)` / `sequence_usage(routing)`: the numbers behind the
  routing panels, as arrays.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from hilora_jax._fs import atomic_file

__all__ = ["plot_results", "plot_routing", "plot_routing_heatmap", "plot_training_curves",
           "routing_fractions", "save_png", "sequence_usage", "trace_usage"]


# -- helpers -----------------------------------------------------------------------------------
def save_png(fig: Figure, path: str | os.PathLike, *, dpi: int = 110) -> Path:
    """Write `fig` as PNG to `path` atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=dpi, bbox_inches="tight")
    return path


def _finish(fig: Figure, save) -> Figure:
    if save is not None:
        save_png(fig, save)
    return fig


def _heatmap(ax, m: np.ndarray, rows: Sequence[str], cols: Sequence[str], *, cmap="viridis",
             vmin=None, vmax=None, annotate: bool = True, fmt: str = "{:.2f}", cbar_label=""):
    m = np.asarray(m, np.float64)
    im = ax.imshow(m, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_xticks(range(len(cols)), [str(c) for c in cols], rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), [str(r) for r in rows])
    if annotate and m.size <= 400:
        lo, hi = np.nanmin(m) if m.size else 0, np.nanmax(m) if m.size else 1
        mid = (lo + hi) / 2
        for (i, j), v in np.ndenumerate(m):
            if np.isfinite(v):
                ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=7,
                        color="white" if v < mid else "black")
    cb = ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if cbar_label:
        cb.set_label(cbar_label)
    return im


def _short(s: str, n: int = 40) -> str:
    s = " ".join(str(s).split())
    return s if len(s) <= n else s[: n - 1] + "…"


# -- sequence-level routing ----------------------------------------------------------------------
def sequence_usage(routing) -> tuple[np.ndarray, str]:
    """Per-prompt, per-LoRA usage `[B, A]` of a `Routing` and what it measures.

    `hilora`: ROCs allotted to each candidate LoRA (`n_rocs` scattered onto the pool axis);
    mixture/fusion routers (`uniform`, `retrieval`, `oracle`): adapter weights. Token-level routers
    (`arrow`, `roc-fixed`) and `base` have no sequence-level usage: an all-zero `[0, A]` array.
    """
    info, n = routing.info, len(routing.names)
    if "cand_idx" in info:
        idx = np.asarray(info["cand_idx"])
        keep = np.asarray(info["cand_valid"]) & (np.asarray(info["n_rocs"]) > 0)
        out = np.zeros((idx.shape[0], n))
        for b in range(idx.shape[0]):
            for c in np.flatnonzero(keep[b]):
                out[b, idx[b, c]] += info["n_rocs"][b, c]
        return out, "ROCs allotted (sequence stage)"
    if "weights" in info:
        return np.asarray(info["weights"], np.float64), "adapter weight"
    return np.zeros((0, n)), ""


_MASKS = ("attention_mask", "decoder_attention_mask")  # the forward's masks travel with a trace
_STACKS = ("encoder", "decoder")


def _parse_trace(trace: Mapping[str, Any]):
    """`{"<layer>.<module>": aux}` -> sorted rows, modules (model order), `{(row, module): aux}`.

    Llama rows are layer indices. T5 keys (`T5Engine.forward`) are `"<block>.<stack>.<row>"`
    (e.g. `"1.encoder.SelfAttention.q"`): their rows are `(stack, block)` pairs, encoder blocks
    first, and their modules the row name without the stack (`"SelfAttention.q"`,
    `"EncDecAttention.k"`, `"DenseReluDense.wo"`), so both stacks share the module columns."""
    from hilora_jax.model.projections import MODULES, T5

    order = list(MODULES) + list(dict.fromkeys(p.name.split(".", 1)[1] for p in T5))
    cells = {}
    for key, aux in trace.items():
        if key in _MASKS:
            continue
        layer, module = key.split(".", 1)
        stack, _, rest = module.partition(".")
        row = (stack, int(layer)) if stack in _STACKS and rest else int(layer)
        cells[(row, rest if isinstance(row, tuple) else module)] = aux
    layers = sorted({k[0] for k in cells},
                    key=lambda r: (_STACKS.index(r[0]), r[1]) if isinstance(r, tuple) else (-1, r))
    mods = sorted({k[1] for k in cells}, key=lambda m: (order.index(m) if m in order else 999, m))
    return layers, mods, cells


def _row_label(row) -> str:
    return f"{row[0]} {row[1]}" if isinstance(row, tuple) else f"layer {row}"


def _reads_encoder(row, module: str) -> bool:
    """Whether a T5 trace cell runs over the encoder sequence (encoder rows and cross-attention
    k/v, which read the encoder output) rather than the decoder's."""
    from hilora_jax.model.projections import projection

    stack = row[0] if isinstance(row, tuple) else None
    return stack == "encoder" or projection(f"{stack}.{module}").reads == "enc_out"


def trace_usage(routing, trace: Mapping[str, Any], mask=None, *, row: int | None = None):
    """Token-level usage from a routing trace (`Engine.forward(..., trace=True)` or
    `T5Engine.forward(..., trace=True)`).

    Returns `(layers, modules, per_module [L, M], per_lora [L, A], unit)`: the mean number of
    ROCs fired per token (`hilora`, `roc-fixed`; `unit="ROCs fired per token"`) or of LoRAs mixed
    per token (`arrow`; `unit="LoRAs mixed per token"`) at each (layer, module), and per layer the
    same split by LoRA (summed over modules). Averages run over real tokens (`mask [B, T]`, the
    trace's `attention_mask` or all tokens when omitted) of every prompt, or of prompt `row`
    only. Cells a module/layer never adapts are NaN.

    T5 traces: `layers` are `(stack, block)` pairs (`"encoder"` blocks, then `"decoder"`), the
    modules are shared by both stacks (`"SelfAttention.q"`, `"EncDecAttention.v"`, ...). Cells
    over the encoder sequence (encoder rows, cross-attention k/v) average over `mask` (default the
    trace's `attention_mask`), the other decoder cells over the trace's `decoder_attention_mask`.
    """
    layers, mods, cells = _parse_trace(trace)
    if mask is None:
        mask = trace.get("attention_mask")
    dec_mask = trace.get("decoder_attention_mask")
    n = len(routing.names)
    info = routing.info
    per_mod = np.full((len(layers), len(mods)), np.nan)
    per_lora = np.zeros((len(layers), n))
    unit = "ROCs fired per token"
    for (layer, mod), aux in cells.items():
        if "fired" in aux:
            f = np.asarray(aux["fired"], np.float64)  # B T C (hilora) or B T A (roc-fixed)
        elif "coeff" in aux:
            f = (np.asarray(aux["coeff"], np.float64) > 0).astype(np.float64)  # B T A
            unit = "LoRAs mixed per token"
        else:
            continue
        b_, t_ = f.shape[:2]
        m = mask
        if isinstance(layer, tuple) and not _reads_encoder(layer, mod):
            m = dec_mask
        w = np.ones((b_, t_)) if m is None else np.asarray(m, np.float64).reshape(b_, t_)
        if row is not None:
            sel = np.zeros(b_)
            sel[row] = 1
            w = w * sel[:, None]
        w = w / max(w.sum(), 1.0)
        per_slot = np.einsum("btc,bt->bc", f, w)  # B C/A: batch-weighted mean per token
        if "cand_idx" in info:  # hilora: candidate slots, the first C of them (the router trims
            c = f.shape[2]      # trailing slots no row gives ROCs)
            idx = np.asarray(info["cand_idx"])[:, :c]
            valid = np.asarray(info["cand_valid"])[:, :c]
            onto = np.zeros((b_, n))
            for b in range(b_):
                np.add.at(onto[b], idx[b], per_slot[b] * valid[b])
        else:
            onto = per_slot
        li, mi = layers.index(layer), mods.index(mod)
        per_mod[li, mi] = onto.sum()
        per_lora[li] += onto.sum(0)
    return layers, mods, per_mod, per_lora, unit


def plot_routing(routing, trace: Mapping[str, Any] | None = None, *, mask=None,
                 prompts: Sequence[str] | None = None, row: int | None = None,
                 title: str | None = None, save: str | os.PathLike | None = None) -> Figure:
    """Which LoRAs each prompt used and how much, plus token-level usage when `trace` is given.

    Panel 1 (sequence level): one stacked horizontal bar per prompt, one colour per LoRA: ROCs
    allotted (`hilora`) or adapter weights (mixture routers). For token-level routers (`arrow`,
    `roc-fixed`) the bars show each LoRA's mean token-level usage from `trace` instead.
    Panels 2-3 (with `trace`): heatmaps of mean token-level usage per layer x module and per
    layer x LoRA (`trace_usage`; `mask [B, T]` excludes padding, `row` selects one prompt). A T5
    trace has one heatmap row per encoder block, then per decoder block (each cell averaged over
    the real tokens of its own sequence).
    """
    names = list(routing.names)
    usage, unit = sequence_usage(routing)
    tu = trace_usage(routing, trace, mask) if trace else None
    if usage.shape[0] == 0 and tu is not None:  # token-level router: per-prompt trace usage
        rows = [trace_usage(routing, trace, mask, row=b)[3].mean(0)
                for b in range(_batch_of(trace))]
        usage, unit = np.stack(rows), tu[4] + " (mean over layers, summed over modules)"
    n_panels = 1 + (2 if tu is not None else 0)
    fig = Figure(figsize=(5.2 * n_panels, max(2.6, 0.45 * max(len(usage), 1) + 1.8)),
                 layout="constrained")
    axes = fig.subplots(1, n_panels, squeeze=False)[0]
    ax = axes[0]
    router = routing.info.get("router", "?")
    if usage.shape[0]:
        labels = ([_short(p) for p in prompts] if prompts is not None
                  else [f"prompt {i}" for i in range(len(usage))])
        left = np.zeros(len(usage))
        cmap = matplotlib.colormaps["tab20"]
        for a, name in enumerate(names):
            if not usage[:, a].any():
                continue
            ax.barh(range(len(usage)), usage[:, a], left=left, label=name, color=cmap(a % 20),
                    edgecolor="white")
            left += usage[:, a]
        ax.set_yticks(range(len(usage)), labels)
        ax.invert_yaxis()
        ax.set_xlabel(unit)
        if "budget" in routing.info:
            for i, b in enumerate(np.asarray(routing.info["budget"])):
                ax.text(left[i], i, f" {int(b)}", va="center", fontsize=8)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(title="LoRA", fontsize=8, loc="best")
    else:
        ax.text(0.5, 0.5, f"{router}: no sequence-level choice\n(pass trace= for token-level use)",
                ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    ax.set_title(title or f"{router}: LoRAs per prompt")
    if tu is not None:
        layers, mods, per_mod, per_lora, tunit = tu
        if row is not None:
            layers, mods, per_mod, per_lora, tunit = trace_usage(routing, trace, mask, row=row)
        who = "all prompts" if row is None else f"prompt {row}"
        _heatmap(axes[1], per_mod, [_row_label(li) for li in layers], mods, cbar_label=tunit,
                 annotate=True, fmt="{:.1f}")
        axes[1].set_title(f"token-level usage per layer x module ({who})")
        _heatmap(axes[2], per_lora, [_row_label(li) for li in layers], names, cbar_label=tunit,
                 annotate=True, fmt="{:.1f}")
        axes[2].set_title(f"token-level usage per layer x LoRA ({who})")
    return _finish(fig, save)


def _batch_of(trace: Mapping[str, Any]) -> int:
    aux = next(v for k, v in trace.items() if k not in _MASKS)
    return int(np.shape(aux.get("fired", aux.get("coeff")))[0])


# -- evaluation results --------------------------------------------------------------------------
def _results_table(results) -> tuple[list[str], list[str], dict]:
    """Normalise `{method: {protocol: res}}` or `{(method, protocol): res}` to a value table."""
    table: dict[tuple[str, str], Any] = {}
    for k, v in results.items():
        if isinstance(k, tuple):
            table[(str(k[0]), str(k[1]))] = v
        elif isinstance(v, Mapping) and not ("mean" in v and "config" in v):
            for p, r in v.items():
                table[(str(k), str(p))] = r
        else:
            proto = v.get("config", {}).get("protocol", "seen") if isinstance(v, Mapping) else "seen"
            table[(str(k), str(proto))] = v
    methods = list(dict.fromkeys(m for m, _ in table))
    protocols = list(dict.fromkeys(p for _, p in table))
    return methods, protocols, table


def _value(r, metric: str) -> float:
    if isinstance(r, Mapping):
        return float(r["mean"][metric] if "mean" in r else r[metric])
    return float(r)


def plot_results(results: Mapping, *, metric: str = "acc", title: str | None = None,
                 save: str | os.PathLike | None = None) -> Figure:
    """Grouped bars of `metric` (`result["mean"][metric]`) per method (x) and protocol (colour).

    `results`: `{method: {protocol: evaluate_result}}`, `{(method, protocol): result}`, or
    `{method: result}` (protocol read from `result["config"]`); a result may also be a number.
    """
    methods, protocols, table = _results_table(results)
    fig = Figure(figsize=(min(14.0, max(4.5, 1.3 * len(methods) * max(1, len(protocols)) ** 0.5 + 2)), 3.6),
                 layout="constrained")
    ax = fig.subplots()
    width = 0.8 / max(len(protocols), 1)
    x = np.arange(len(methods))
    for j, p in enumerate(protocols):
        vals = [(_value(table[(m, p)], metric) if (m, p) in table else np.nan) for m in methods]
        bars = ax.bar(x + (j - (len(protocols) - 1) / 2) * width, vals, width, label=p)
        ax.bar_label(bars, labels=["" if np.isnan(v) else f"{v:.2f}" for v in vals], fontsize=7,
                     padding=1)
    ax.set_xticks(x, methods)
    ax.set_ylabel(metric)
    ax.set_ylim(0, 1.05 if metric.startswith("acc") else None)
    ax.legend(title="protocol", fontsize=8)
    ax.set_title(title or f"{metric} by method and protocol")
    return _finish(fig, save)


# -- task x LoRA ---------------------------------------------------------------------------------
def routing_fractions(routing, tasks: Sequence[str], *, task_order: Sequence[str] | None = None
                      ) -> tuple[np.ndarray, list[str], list[str]]:
    """Fraction of each task's examples routed to each LoRA: `(matrix [tasks, A], tasks, names)`.

    A row of `routing` counts as routed to a LoRA when the LoRA got ROCs (`hilora`) or a
    positive weight (mixture routers). `tasks[i]` is the task of row `i`.
    """
    usage, _ = sequence_usage(routing)
    if usage.shape[0] != len(tasks):
        raise ValueError(f"{len(tasks)} task labels for {usage.shape[0]} routed rows (token-level "
                         "routers have no sequence-level choice to count)")
    order = list(task_order) if task_order is not None else list(dict.fromkeys(tasks))
    tasks_a = np.asarray(tasks)
    m = np.zeros((len(order), usage.shape[1]))
    for i, t in enumerate(order):
        rows = usage[tasks_a == t]
        if len(rows):
            m[i] = (rows > 0).mean(0)
    return m, order, list(routing.names)


def plot_routing_heatmap(matrix, row_labels: Sequence[str], col_labels: Sequence[str], *,
                         title: str = "fraction of each task's examples routed to each LoRA",
                         xlabel: str = "LoRA", ylabel: str = "task", annotate: bool = True,
                         save: str | os.PathLike | None = None) -> Figure:
    """A task x LoRA heatmap (values in [0, 1]); see `routing_fractions`."""
    m = np.asarray(matrix, np.float64)
    if m.shape != (len(row_labels), len(col_labels)):
        raise ValueError(f"matrix shape {m.shape} does not match {len(row_labels)} row labels x "
                         f"{len(col_labels)} column labels")
    fig = Figure(figsize=(max(4.0, 0.55 * len(col_labels) + 2.5),
                          max(2.5, 0.4 * len(row_labels) + 1.6)), layout="constrained")
    ax = fig.subplots()
    _heatmap(ax, m, row_labels, col_labels, vmin=0.0, vmax=1.0, annotate=annotate,
             cbar_label="fraction")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return _finish(fig, save)


# -- training ------------------------------------------------------------------------------------
def plot_training_curves(curves: Mapping[str, Sequence[float]], *, title: str = "LoRA training loss",
                         save: str | os.PathLike | None = None) -> Figure:
    """One loss curve per trained adapter (`{name: TrainedLora.losses}`), loss vs step."""
    fig = Figure(figsize=(5.5, 3.4), layout="constrained")
    ax = fig.subplots()
    for name, losses in curves.items():
        ax.plot(np.arange(1, len(losses) + 1), np.asarray(losses, np.float64), label=str(name))
    ax.set_xlabel("step")
    ax.set_ylabel("loss (answer tokens)")
    ax.set_title(title)
    if curves:
        ax.legend(fontsize=8)
    return _finish(fig, save)


# -- calibration ---------------------------------------------------------------------------------
def calibration_matrix(cal, own, n_adapters: int | None = None) -> np.ndarray:
    """``[A, A]`` median calibrated score of LoRA j (column) over the inputs of task i (row)."""
    cal = np.asarray(cal, np.float64)
    own = np.asarray(own)
    if cal.ndim != 2 or own.shape != (cal.shape[0],):
        raise ValueError(f"cal must be [N, A] and own [N], got {cal.shape} and {own.shape}")
    a = cal.shape[1] if n_adapters is None else n_adapters
    m = np.full((a, cal.shape[1]), np.nan)
    for i in range(a):
        if (own == i).any():
            m[i] = np.median(cal[own == i], axis=0)
    return m


def plot_calibration(cal, own, names: Sequence[str], *, floor: float | None = -3.0,
                     title: str = "calibrated scores: own-task inputs vs others",
                     save: str | os.PathLike | None = None) -> Figure:
    """Calibration curves of HiLoRA's calibrated scores ``c_i(x)`` (``Routing.info['cal_scores']``).

    ``cal`` [N, A] for N inputs whose own adapter index is ``own`` [N]. Left: the empirical CDF of
    the own LoRA's score (own-task inputs) and of the best *other* LoRA's score, clipped to
    [-30, 10] (0 = as typical as the LoRA's own held-out samples; the dotted line is the rule's
    ``floor``). Right: task x LoRA median calibrated score (clipped at -30).
    """
    cal = np.asarray(cal, np.float64)
    own = np.asarray(own)
    if len(names) != cal.shape[1]:
        raise ValueError(f"{len(names)} names for {cal.shape[1]} adapters")
    rows = np.arange(len(own))
    own_c = cal[rows, own]
    others = cal.copy()
    others[rows, own] = -np.inf
    best_other = others.max(1)
    fig = Figure(figsize=(11.0, max(3.6, 0.35 * len(names) + 1.8)), layout="constrained")
    ax, ax2 = fig.subplots(1, 2, width_ratios=[1.0, 1.3])
    for v, label in ((own_c, "own LoRA"), (best_other, "best other LoRA")):
        v = np.sort(np.clip(v[np.isfinite(v)], -30, 10))
        ax.plot(v, np.arange(1, len(v) + 1) / max(len(v), 1), label=label)
    if floor is not None:
        ax.axvline(floor, ls=":", color="k", label=f"floor {floor:g}")
    ax.axvline(0.0, ls="--", color="gray", lw=0.8)
    ax.set_xlabel("calibrated score c (clipped to [-30, 10])")
    ax.set_ylabel("fraction of inputs <= c")
    ax.legend(fontsize=8)
    ax.set_title("CDF")
    m = np.clip(calibration_matrix(cal, own, len(names)), -30, None)
    _heatmap(ax2, m, [_short(n, 28) for n in names], [_short(n, 18) for n in names],
             cmap="magma", fmt="{:.0f}", cbar_label="median c")
    ax2.set_xlabel("LoRA")
    ax2.set_ylabel("inputs of task")
    fig.suptitle(title)
    return _finish(fig, save)
