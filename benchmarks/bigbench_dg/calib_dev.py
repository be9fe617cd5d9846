"""Dev-split study of HiLoRA's sequence stage (issue 13): score calibration, adaptive candidate
sets and allocation, on the BIG-bench DG benchmark pool (13 tasks, 7 clusters; see README).

Only the **dev** split (32 items carved from train + up to 64 held-out items per task; never
trained on) is read; the test split is never loaded.

Stages (each cached under `--out`):

* `prepare`: write the splits of the 13 pool tasks exactly as `run.py` does (seeded per task, so
  they equal the benchmark's), and train their LoRAs (r=8, q/v, top 4 layers, 40 steps) into a
  pool, as `run.py` does.
* `decisions`: routing decisions only (no LLM forward for MiniLM): for every variant (embedder x
  estimator x m x rule), per protocol: candidate-set size distribution, how often the cap binds,
  own LoRA among the candidates / ranked first, own LoRA's share of ROCs, total ROCs (capacity)
  as a fraction of one LoRA's rank, and calibration curves. Writes `decisions.json` / `.md`.
* `accuracy`: dev accuracy of a few routers x protocols with paired differences (LLM forward).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from hilora_jax.eval.runner import PROTOCOLS as _PROTOCOLS

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

POOL_TASKS = {  # the 13 tasks the benchmark's dev screen selected (README), with their clusters
    "bbq_lite_json/age_ambig": "bbq_lite_json",
    "bbq_lite_json/disability_status_ambig": "bbq_lite_json",
    "bbq_lite_json/gender_identity_ambig": "bbq_lite_json",
    "bbq_lite_json/nationality_ambig": "bbq_lite_json",
    "bbq_lite_json/physical_appearance_ambig": "bbq_lite_json",
    "disambiguation_qa": "bias-truth",
    "fact_checker/fever": "fact_checker",
    "movie_recommendation": "emotion-social",
    "unit_conversion/different_systems": "unit_conversion",
    "unit_conversion/si_conversion": "unit_conversion",
}
POOL_GYM = ["count_bits", "fraction_simplification", "syllogism"]
PROTOCOLS = list(_PROTOCOLS)


def log(*a):
    print("[calib_dev]", *a, file=sys.stderr, flush=True)


def load_splits(out: Path, tok):
    from run import MAX_LEN, split_dev  # noqa: F401

    from hilora_jax.eval.tasks import load_tasks
    from hilora_jax.lora.build import fitting

    data = out / "data"
    by = defaultdict(list)
    for ex in load_tasks(data / "dev.jsonl") + load_tasks(data / "holdout.jsonl"):
        by[ex.task].append(ex)
    dev = [e for t in sorted(by) for e in fitting(by[t], tok, MAX_LEN)]
    return (load_tasks(data / "train_fit.jsonl"), load_tasks(data / "samples.jsonl"), dev)


def prepare(args):
    from run import MAX_LEN, MAX_TRAIN, N_SAMPLES, split_dev

    from hilora_jax.eval import gym
    from hilora_jax.eval.bigbench import write_splits
    from hilora_jax.eval.tasks import load_tasks, write_jsonl
    from hilora_jax.io.assets import bigbench_tasks_dir
    from hilora_jax.io.loading import load_model, load_tokenizer
    from hilora_jax.lora.build import build_task_pool

    out = Path(args.out)
    data = out / "data"
    model, tok = load_model("smollm2"), load_tokenizer("smollm2")
    n_dev, n_holdout, n_test = 32, 64, 50
    if not (data / "dev.jsonl").exists():
        n_need = n_test + N_SAMPLES + MAX_TRAIN + n_dev + n_holdout
        gyms = {f"gym.{g}": gym.generate(g, size=n_need + 30, seed=0) for g in POOL_GYM}
        write_splits(POOL_TASKS, bigbench_tasks_dir(), data, seed=0, n_samples=N_SAMPLES,
                     n_test=n_test, max_train=MAX_TRAIN + n_dev, n_holdout=n_holdout, extra=gyms)
        train, dev = split_dev(load_tasks(data / "train.jsonl"), n_dev, 0)
        write_jsonl(train, data / "train_fit.jsonl")
        write_jsonl(dev, data / "dev.jsonl")
        (data / "test.jsonl").unlink()  # never read here: remove the temptation
    train = load_tasks(data / "train_fit.jsonl")
    samples = load_tasks(data / "samples.jsonl")
    L = model.config.num_layers
    t0 = time.time()
    build_task_pool(model, tok, train, samples, out / "pool_build", base_name="smollm2",
                    layers=list(range(L - 4, L)), steps=40, lr=3e-3, max_train=MAX_TRAIN,
                    max_len=MAX_LEN, seed=0)
    log(f"pool ready in {time.time() - t0:.1f}s")


# ----------------------------------------------------------------------------- decisions


def _texts(out: Path):
    """(pool task names, clusters, samples per task for m in (20, 50, 100), dev examples)."""
    from hilora_jax.eval.tasks import load_tasks

    data = out / "data"
    samples, train = defaultdict(list), defaultdict(list)
    for ex in load_tasks(data / "samples.jsonl"):
        samples[ex.task].append(ex.prompt)
    for ex in load_tasks(data / "train_fit.jsonl"):
        train[ex.task].append(ex.prompt)
    names = sorted(samples)
    clusters = {}
    dev = []
    for ex in load_tasks(data / "dev.jsonl") + load_tasks(data / "holdout.jsonl"):
        dev.append(ex)
        clusters[ex.task] = ex.cluster
    by_m = {}
    for m in (20, 50, 100):
        by_m[m] = {}
        for t in names:
            extra = m - len(samples[t])
            rng = np.random.default_rng([7, len(t), m])
            pick = rng.permutation(len(train[t]))[:extra] if extra > 0 else []
            by_m[m][t] = samples[t] + [train[t][i] for i in sorted(pick)]
    return names, clusters, by_m, dev


def _embed_all(out: Path, embedder: str, names, by_m, dev):
    """Embeddings of every sample text (for the m in `by_m`) and dev prompt, cached in
    `out/emb_<embedder>.npz`."""
    path = out / f"emb_{embedder.replace(':', '-')}.npz"
    texts = sorted({t for m in by_m for n in names for t in by_m[m][n]} | {e.prompt for e in dev})
    have = {}
    if path.exists():
        z = np.load(path)
        have = dict(zip(z["texts"].tolist(), z["emb"], strict=True))
    missing = [t for t in texts if t not in have]
    if not missing:
        return have
    t0 = time.time()
    if embedder == "minilm":
        from hilora_jax.embed import load_embedder

        emb = load_embedder("minilm")
    else:
        from hilora_jax.embed.llm import LLMEmbedder
        from hilora_jax.inference import Engine
        from hilora_jax.io.loading import load_model, load_tokenizer

        model = load_model("smollm2")
        emb = LLMEmbedder(Engine(model), load_tokenizer("smollm2"), int(embedder.split(":")[1]))
    vecs = np.concatenate([np.asarray(emb(missing[i:i + 64]), np.float32)
                           for i in range(0, len(missing), 64)])
    log(f"embedded {len(missing)} texts with {embedder} in {time.time() - t0:.1f}s")
    have.update(zip(missing, vecs, strict=True))
    keys = sorted(have)
    np.savez(path, texts=np.array(keys), emb=np.stack([have[k] for k in keys]))
    return have


def _protocol_masks(names, clusters, dev):
    a = len(names)
    own = np.array([names.index(e.task) for e in dev])
    cl = np.array([clusters[n] for n in names])
    masks = {"seen": np.ones((len(dev), a), bool)}
    within = np.ones((len(dev), a), bool)
    within[np.arange(len(dev)), own] = False
    masks["unseen-within"] = within
    masks["unseen-cross"] = np.array([cl != e.cluster for e in dev])
    return own, masks


def decision_metrics(info, own, active, clusters_arr, dev_cluster, rank=8):
    """Per-protocol routing statistics from decision arrays (numpy)."""
    valid = info["cand_valid"] & (info["n_rocs"] > 0)
    n = np.where(valid, info["n_rocs"], 0)
    idx = info["cand_idx"]
    size = valid.sum(1)
    tot = n.sum(1)
    own_n = np.where(valid & (idx == own[:, None]), n, 0).sum(1)
    same_cl = np.where(valid & (clusters_arr[idx] == dev_cluster[:, None]), n, 0).sum(1)
    kap = info["kappa"]
    per_item = {"own_roc_share": np.where(tot > 0, own_n / np.maximum(tot, 1), 0.0),
                "capacity": tot / rank, "candidates": size.astype(np.float64)}
    hist = {str(k): float(np.mean(size == k)) for k in range(0, 4)}
    hist["4+"] = float(np.mean(size >= 4))
    return {
        "mean_candidates": float(size.mean()),
        "size_hist": hist,
        "cap_binds": float(np.mean(info["cap_binds"])),
        "own_in_candidates": float(np.mean(own_n > 0)),
        "own_first": float(np.mean(valid[:, 0] & (idx[:, 0] == own))),
        "own_roc_share": float(np.mean(np.where(tot > 0, own_n / np.maximum(tot, 1), 0.0))),
        "cluster_roc_share": float(np.mean(np.where(tot > 0, same_cl / np.maximum(tot, 1), 0.0))),
        "capacity": float(np.mean(tot / rank)),  # total ROCs in units of one LoRA's rank
        "scaled_capacity": float(np.mean(kap * tot / rank)),
        "no_lora": float(np.mean(tot == 0)),
    }, per_item


def _paired(a, b):
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    return {"diff": float(d.mean()), "se": float(d.std(ddof=1) / np.sqrt(len(d)))}


def _decide_all(bank, z, ranks, masks, rule_cfg):
    import jax

    from hilora_jax.routing.gaussian import log_likelihood
    from hilora_jax.routing.sequence import calibrated_decisions, sequence_decisions
    from hilora_jax.routing.token import kappa

    ll = np.asarray(log_likelihood(bank, z), np.float64)
    s = ll / bank.dim
    cal = (ll - np.asarray(bank.cal_loc)[None]) / np.asarray(bank.cal_scale)[None]
    cfg = dict(rule_cfg)
    rule = cfg.pop("rule")
    kmode = cfg.pop("kappa")
    out = {}
    for proto, act in masks.items():
        if rule == "paper":
            dec = sequence_decisions(jax.numpy.asarray(s, "float32"), ranks, act, **cfg)
        else:
            dec = calibrated_decisions(jax.numpy.asarray(cal, "float32"), ranks, act, **cfg)
        info = {k: np.asarray(getattr(dec, k)) for k in ("cand_idx", "cand_valid", "n_rocs",
                                                          "cap_binds", "budget")}
        info["kappa"] = np.asarray(kappa(dec.n_rocs, kmode))
        out[proto] = info
    return out, s, cal


def calibration_curve(cal, own):
    """Quantiles of the own LoRA's calibrated score vs the best other-cluster LoRA's score and
    the AUC of own-task inputs against other tasks' inputs, averaged over LoRAs."""
    a = cal.shape[1]
    aucs = []
    for i in range(a):
        pos, neg = cal[own == i, i], cal[own != i, i]
        if len(pos) and len(neg):
            aucs.append(float(np.mean(pos[:, None] > neg[None, :])))
    own_c = cal[np.arange(len(own)), own]
    return {"own_quantiles": np.percentile(own_c, [5, 25, 50, 75, 95]).round(2).tolist(),
            "auc": float(np.mean(aucs))}


RULE_PAPER = dict(rule="paper", k=3, gamma=0.4, tau=1.0, max_candidates=8, kappa="sqrt")


def _rule(floor=-3.0, margin=3.0, tau=1.0, allocation="relative", kappa="sqrt-eff", full_at=0.0):
    return dict(rule="calibrated", floor=floor, margin=margin, full_at=full_at, tau=tau,
                max_candidates=8, allocation=allocation, kappa=kappa)


def decisions(args):
    from hilora_jax.eval.tasks import load_tasks
    from hilora_jax.routing.gaussian import fit_gaussians

    out = Path(args.out)
    names, clusters, by_m, dev = _texts(out)
    own, masks = _protocol_masks(names, clusters, dev)
    cl_arr = np.array([clusters[n] for n in names])
    dev_cl = np.array([e.cluster for e in dev])
    ranks = np.full(len(names), 8, np.int32)  # the pool: r = 8 for every LoRA
    embedders = args.embedders.split(",")
    rows = []
    t0 = time.time()
    small = {ex.prompt for ex in load_tasks(out / "data" / "dev.jsonl")}
    for emb_name in embedders:
        ms = (20, 50, 100)
        if emb_name.startswith("small:"):
            # the LLM embedder is slow on this shared CPU: m = 20 and the 32 carved dev items
            # per task only (for a paired comparison run `small:minilm` too)
            emb_name, ms = emb_name.split(":", 1)[1], (20,)
            dev_e = [e for e in dev if e.prompt in small]
            own, masks = _protocol_masks(names, clusters, dev_e)
            dev_cl = np.array([e.cluster for e in dev_e])
            label = f"{emb_name} (carved dev)"
        else:
            dev_e, label = dev, emb_name
            own, masks = _protocol_masks(names, clusters, dev_e)
            dev_cl = np.array([e.cluster for e in dev_e])
        table = _embed_all(out, emb_name, names, {m: by_m[m] for m in ms}, dev_e)
        z = np.stack([table[e.prompt] for e in dev_e])
        for m in ms:
            xs = [np.stack([table[t] for t in by_m[m][n]]) for n in names]
            for est, pca_dim in (("ledoit_wolf", None), ("diag", None), ("pca", m // 2)):
                if m != 20 and est != "ledoit_wolf" and emb_name != "minilm":
                    continue
                tf = time.time()
                # seen: basis from every adapter; the protocols' PCA basis on active adapters
                # only is exercised in the router (here one bank for the whole pool).
                bank = fit_gaussians(xs, est, pca_dim=pca_dim, calibrate=True, names=names)
                fit_s = time.time() - tf
                rules = {"paper-raw": RULE_PAPER}
                if (label, m, est) == ("minilm", 20, "ledoit_wolf"):
                    for fl in (-2.0, -3.0, -5.0, -8.0, -12.0):
                        for mg in (1.0, 3.0, 6.0):
                            rules[f"cal f{fl:g} m{mg:g}"] = _rule(fl, mg)
                    rules["cal f-5 m3 tau0.5"] = _rule(-5.0, 3.0, tau=0.5)
                    rules["cal f-5 m3 tau2"] = _rule(-5.0, 3.0, tau=2.0)
                    rules["cal f-5 m3 budget"] = _rule(-5.0, 3.0, allocation="budget")
                    rules["cal f-5 m3 kappa-sqrt"] = _rule(-5.0, 3.0, kappa="sqrt")
                    rules["cal f-5 m3 full_at-2"] = _rule(-5.0, 3.0, full_at=-2.0)
                else:
                    for fl in (-3.0, -5.0, -8.0):
                        rules[f"cal f{fl:g} m3"] = _rule(fl, 3.0)
                decs = None
                items = {}
                for rule_label, cfg in rules.items():
                    decs, s, cal = _decide_all(bank, z, ranks, masks, cfg)
                    row = {"embedder": label, "n_dev": len(dev_e), "m": m, "estimator": est, "pca_dim": pca_dim,
                           "rule": rule_label, "config": cfg, "fit_s": round(fit_s, 2)}
                    items[rule_label] = {}
                    for proto, info in decs.items():
                        row[proto], items[rule_label][proto] = decision_metrics(
                            info, own, masks[proto], cl_arr, dev_cl)
                    if rule_label != "paper-raw":  # per item: this rule minus the paper's rule
                        row["paired_vs_raw"] = {
                            proto: {k: _paired(items[rule_label][proto][k],
                                               items["paper-raw"][proto][k])
                                    for k in ("own_roc_share", "capacity", "candidates")}
                            for proto in decs}
                    row["calibration"] = calibration_curve(cal, own)
                    rows.append(row)
                log(f"{emb_name} m={m} {est}: {len(rules)} rules ({time.time() - t0:.0f}s)")
                _write_rows(args, rows, names, clusters, t0)
                if (m, est) == (20, "ledoit_wolf"):
                    _plot_curves(args, cal, own, names, label)
    text = _write_rows(args, rows, names, clusters, t0)
    print(text)


def _write_rows(args, rows, names, clusters, t0):
    """decisions.json / .md so far (written after every fitted bank: an interrupted run keeps
    what it measured)."""
    from hilora_jax.eval.runner import write_json_atomic

    res = Path(args.results)
    res.mkdir(parents=True, exist_ok=True)
    write_json_atomic(res / "decisions.json", {"pool": names, "clusters": clusters, "rows": rows,
                                               "seconds": round(time.time() - t0, 1)})
    text = render_decisions(rows) + render_paired(rows)
    (res / "decisions.md").write_text(text)
    return text


def _plot_curves(args, cal, own, names, emb_name):
    from hilora_jax.viz import plot_calibration

    res = Path(args.results)
    res.mkdir(parents=True, exist_ok=True)
    tag = emb_name.replace(":", "-").replace(" (carved dev)", "-carved")
    plot_calibration(cal, own, names, save=res / f"calibration_{tag}.png",
                     title=f"calibrated scores ({emb_name}, Ledoit-Wolf, m=20): own-task inputs vs others")


def render_paired(rows):
    lines = ["", "Paired per-item differences, calibrated rule minus the paper's rule on the same "
             "bank (mean +- standard error over dev items): own LoRA's ROC share in `seen`; "
             "capacity (total ROCs / 8) per protocol.", "",
             "| embedder | m | estimator | rule | own share (seen) | capacity seen | "
             "capacity within | capacity cross |", "|---|---|---|---|---|---|---|---|"]
    f = lambda x: f"{x['diff']:+.3f} +- {x['se']:.3f}"
    for r in rows:
        p = r.get("paired_vs_raw")
        if p:
            lines.append(f"| {r['embedder']} | {r['m']} | {r['estimator']} | {r['rule']} | "
                         f"{f(p['seen']['own_roc_share'])} | {f(p['seen']['capacity'])} | "
                         f"{f(p['unseen-within']['capacity'])} | {f(p['unseen-cross']['capacity'])} |")
    return "\n".join(lines) + "\n"


def render_decisions(rows):
    n_dev = sorted({r["n_dev"] for r in rows})
    lines = [f"Routing decisions on the dev split ({' or '.join(map(str, n_dev))} items: the "
             "'carved dev' rows use the 32 carved items per task only; 13 LoRAs of rank 8). Per "
             "protocol: mean candidates (LoRAs with ROCs) | own LoRA first | own LoRA's share of "
             "ROCs | same-cluster share | capacity (total ROCs / 8) | no-LoRA rate; cap = how often "
             "max_candidates bound (seen). AUC: own-task vs other inputs by c_i.", "",
             "| embedder | m | estimator | rule | seen | unseen-within | unseen-cross | cap | AUC |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def cell(p, r=r):
            x = r[p]
            if p == "seen":
                return (f"{x['mean_candidates']:.2f} / {x['own_first']:.2f} / "
                        f"{x['own_roc_share']:.2f} / cap {x['capacity']:.2f}")
            return (f"{x['mean_candidates']:.2f} / cl {x['cluster_roc_share']:.2f} / "
                    f"cap {x['capacity']:.2f} / none {x['no_lora']:.2f}")
        lines.append(f"| {r['embedder']} | {r['m']} | {r['estimator']}"
                     f"{'' if r['pca_dim'] is None else ' d=' + str(r['pca_dim'])} | {r['rule']} | "
                     f"{cell('seen')} | {cell('unseen-within')} | {cell('unseen-cross')} | "
                     f"{r['seen']['cap_binds']:.2f} | {r['calibration']['auc']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stage", choices=["prepare", "decisions", "accuracy"])
    p.add_argument("--out", default="artifacts/bigbench_dg/calib")
    p.add_argument("--results", default=str(HERE / "results" / "calib_dev"))
    p.add_argument("--embedders", default="minilm,small:minilm,small:llm:15",
                   help="comma list; 'small:X' = m=20 and the carved dev items only")
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.stage == "prepare":
        prepare(args)
    elif args.stage == "decisions":
        decisions(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
