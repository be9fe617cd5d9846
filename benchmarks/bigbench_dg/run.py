"""BIG-bench domain-generalization benchmark on SmolLM2-135M-Instruct (method doc section 7).

One command (see README): screen candidate tasks, build the pool, and run every router under all
three protocols.

1. Candidates: BIG-bench JSON multiple-choice tasks with >= `--min-examples` examples, <= 5 choices
   and short inputs (p90 prompt+choice <= `--max-tokens`), up to `--per-family` subtasks per family.
   Cluster = the BIG-bench family when it gives >= 2 tasks (related subtasks), else a cluster
   proposed from the task's keywords (`eval.bigbench.propose_cluster`).
2. Splits (seeded, disjoint): `samples` (m = 20, HiLoRA's per-LoRA inputs), `test` (50),
   `dev` (32, carved from train, never trained on), `train` (the rest, <= 256 used).
3. A LoRA per candidate (r=8, alpha=16, q/v, top `--top-layers` layers; trained with a cached
   frozen prefix), written as PEFT adapters (cached in `--out`).
4. Selection on *dev* (never on test): keep tasks whose LoRA beats zero-shot by >= `--min-gain`.
5. The pool of the selected LoRAs; every router x protocol on the *test* split of the selected
   tasks, sharing the un-adapted prefix of the model between runs.
6. `results.json`, `results.md` (methods x protocols, mean and per cluster), and PNG plots
   (accuracy by method and protocol; task x LoRA routing heatmap for hilora and retrieval).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROUTERS = ["base", "oracle", "uniform", "retrieval", "arrow", "roc-fixed", "hilora"]
PROTOCOLS = ["seen", "unseen-within", "unseen-cross"]


def log(*a):
    print("[bigbench_dg]", *a, file=sys.stderr, flush=True)


def find_candidates(root, tok, args):
    from hilora_jax.eval import bigbench as bb
    from hilora_jax.eval.tasks import choice_text, encode

    found = []
    per_family = defaultdict(int)
    for name, path in sorted(bb.list_tasks(root).items()):
        fam = name.split("/")[0]
        if per_family[fam] >= args.per_family:
            continue
        try:
            t = bb.read_task(path, name)
        except (ValueError, json.JSONDecodeError):
            continue
        if sum("target_scores" in e for e in t.examples) < args.min_examples:
            continue
        exs = bb.to_mc_examples(t, "x", seed=args.seed)
        if len(exs) < args.min_examples or max(len(e.choices) for e in exs) > 5:
            continue
        probe = exs[:: max(1, len(exs) // 40)][:40]
        lens = [len(encode(tok, e.prompt, special=True))
                + max(len(encode(tok, choice_text(c), special=False)) for c in e.choices)
                for e in probe]
        if float(np.percentile(lens, 90)) > args.max_tokens:
            continue
        per_family[fam] += 1
        found.append((name, fam, bb.propose_cluster(t.keywords)))
    fams = defaultdict(int)
    for _, fam, _ in found:
        fams[fam] += 1
    return {name: (fam if fams[fam] >= 2 else kw) for name, fam, kw in found}


def split_dev(train, n_dev, seed):
    by = defaultdict(list)
    for ex in train:
        by[ex.task].append(ex)
    tr, dev = [], []
    for task, exs in sorted(by.items()):
        rng = np.random.default_rng([seed, len(task)])
        idx = rng.permutation(len(exs))
        dev += [exs[i] for i in idx[:n_dev]]
        tr += [exs[i] for i in idx[n_dev:]]
    return tr, dev


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--out", default="artifacts/bigbench_dg/run")
    p.add_argument("--results", default="benchmarks/bigbench_dg/results")
    p.add_argument("--min-examples", type=int, default=200)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--per-family", type=int, default=4)
    p.add_argument("--max-candidates", type=int, default=48)
    p.add_argument("--top-layers", type=int, default=4)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--min-gain", type=float, default=0.15)
    p.add_argument("--n-test", type=int, default=50)
    p.add_argument("--n-dev", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--routers", default=",".join(ROUTERS))
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from hilora_jax.assets import bigbench_tasks_dir
    from hilora_jax.eval.bigbench import write_splits
    from hilora_jax.eval.runner import (
        PrefixScorer,
        evaluate,
        first_adapted_layer,
        write_json_atomic,
    )
    from hilora_jax.eval.tasks import load_tasks, write_jsonl
    from hilora_jax.inference import Engine
    from hilora_jax.loading import load_model, load_tokenizer
    from hilora_jax.lora import load_pool
    from hilora_jax.poolbuild import build_task_pool
    from hilora_jax.routing import build_router

    t_start = time.time()
    out, res_dir = Path(args.out), Path(args.results)
    res_dir.mkdir(parents=True, exist_ok=True)
    model, tok = load_model(args.model), load_tokenizer(args.model)
    eng = Engine(model)
    L = model.config.num_layers
    root = bigbench_tasks_dir()

    # 1-2. candidates and splits ------------------------------------------------------------------
    data = out / "data"
    if not (data / "test.jsonl").exists():
        cands = find_candidates(root, tok, args)
        names = list(cands)[: args.max_candidates]
        log(f"{len(cands)} candidate tasks; using {len(names)}")
        write_splits({n: cands[n] for n in names}, root, data, seed=args.seed,
                     n_test=args.n_test, max_train=256 + args.n_dev)
        train, dev = split_dev(load_tasks(data / "train.jsonl"), args.n_dev, args.seed)
        write_jsonl(train, data / "train_fit.jsonl")
        write_jsonl(dev, data / "dev.jsonl")
    from hilora_jax.poolbuild import fitting

    def fit(exs):  # drop the rare over-long items (p90 <= max-tokens, but outliers exist)
        by = defaultdict(list)
        for ex in exs:
            by[ex.task].append(ex)
        return [e for t in sorted(by) for e in fitting(by[t], tok, 256)]

    train, dev = load_tasks(data / "train_fit.jsonl"), fit(load_tasks(data / "dev.jsonl"))
    samples, test = load_tasks(data / "samples.jsonl"), fit(load_tasks(data / "test.jsonl"))

    # 3. a LoRA per candidate --------------------------------------------------------------------
    layers = list(range(L - args.top_layers, L))
    t0 = time.time()
    build_task_pool(model, tok, train, samples, out / "candidates", base_name=str(args.model),
                    layers=layers, steps=args.steps, lr=args.lr, max_train=256, seed=args.seed)
    t_train = time.time() - t0
    cand_pool = load_pool(out / "candidates" / "pool", model=model)

    # 4. selection on dev: oracle (own LoRA) vs base ------------------------------------------------
    scorer = PrefixScorer(eng, first_adapted_layer(cand_pool))
    base_dev = evaluate(eng, tok, cand_pool, build_router("base", cand_pool), dev, scorer=scorer,
                        progress=False)
    orc_dev = evaluate(eng, tok, cand_pool, build_router("oracle", cand_pool), dev, scorer=scorer,
                       progress=False)
    screen = []
    for task in sorted(base_dev["tasks"]):
        b, o = base_dev["tasks"][task]["acc"], orc_dev["tasks"][task]["acc"]
        screen.append({"task": task, "cluster": base_dev["tasks"][task]["cluster"],
                       "base_dev": b, "lora_dev": o, "gain": o - b})
    chosen = [s for s in screen if s["gain"] >= args.min_gain]
    clusters = sorted({s["cluster"] for s in chosen})
    log(f"selected {len(chosen)} tasks in {len(clusters)} clusters (gain >= {args.min_gain} on dev)")
    write_json_atomic(res_dir / "screen.json", screen)
    if len(chosen) < 2:
        log("fewer than 2 tasks selected: nothing to route; see screen.json")
        return 1
    keep = {s["task"] for s in chosen}

    # 5. the pool of selected LoRAs; every router x protocol on test ---------------------------------
    pool = cand_pool.select(sorted(keep))
    test_sel = [ex for ex in test if ex.task in keep]
    scorer = PrefixScorer(eng, first_adapted_layer(pool))
    results, routing_maps = {}, {}
    t0 = time.time()
    for name in args.routers.split(","):
        router = build_router(name, pool)
        for proto in PROTOCOLS:
            if name in ("base",) and proto != "seen":
                results[(name, proto)] = results[(name, "seen")]
                continue
            if name == "oracle" and proto != "seen":
                continue  # the own LoRA is removed by definition
            log(f"evaluating {name} / {proto}")
            r = evaluate(eng, tok, pool, router, test_sel, protocol=proto, scorer=scorer,
                         progress=False, out=out / "eval" / f"{name}_{proto}.json",
                         config={"router_options": {}})
            results[(name, proto)] = r
        if name in ("hilora", "retrieval"):
            routing_maps[name] = _routing_map(router, pool, test_sel)
    t_eval = time.time() - t0
    _write_outputs(res_dir, results, routing_maps, pool, screen, chosen, args,
                   {"train_s": round(t_train, 1), "eval_s": round(t_eval, 1),
                    "total_s": round(time.time() - t_start, 1)})
    return 0


def _routing_map(router, pool, examples):
    """task x LoRA: fraction of each task's test prompts whose top choice is that LoRA (seen)."""
    tasks = sorted({ex.task for ex in examples})
    m = np.zeros((len(tasks), len(pool)))
    for i, t in enumerate(tasks):
        prompts = [ex.prompt for ex in examples if ex.task == t]
        info = router.route(prompts).info
        if "cand_idx" in info:
            top = info["cand_idx"][:, 0]
        else:
            top = np.argmax(info["weights"], axis=1)
        for j in top:
            m[i, j] += 1.0 / len(prompts)
    return {"tasks": tasks, "loras": list(pool.names), "matrix": m.tolist()}


def _write_outputs(res_dir, results, routing_maps, pool, screen, chosen, args, timing):
    from hilora_jax.eval.runner import write_json_atomic
    from hilora_jax.viz import plot_results, plot_routing_heatmap

    methods = list(dict.fromkeys(m for m, _ in results))
    clusters = sorted({c for r in results.values() for c in r["clusters"]})
    table = {f"{m}/{p}": {"mean": r["mean"], "clusters": r["clusters"], "tasks": r["tasks"],
                          "routing": r["routing"]} for (m, p), r in results.items()}
    import platform

    meta = {"command": "python " + " ".join(sys.argv), "args": vars(args), "timing": timing,
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "pool": list(pool.names), "clusters": {n: pool.clusters[n] for n in pool.names}}
    write_json_atomic(res_dir / "results.json", {"meta": meta, "results": table,
                                                 "screen": screen, "routing_maps": routing_maps})
    lines = [f"`{meta['command']}`", "",
             f"SmolLM2-135M-Instruct; {len(pool)} task LoRAs (r=8, q/v, top {args.top_layers} "
             f"layers) in {len(clusters)} clusters; test: {sum(r['mean']['examples'] for (m, p), r in results.items() if (m, p) == ('base', 'seen'))} items; "
             f"machine {meta['machine']}; train {timing['train_s']}s, eval {timing['eval_s']}s.", "",
             "Mean accuracy (acc = summed log-prob of the choice; acc_norm = per token):", "",
             "| method | " + " | ".join(PROTOCOLS) + " |", "|---" * (len(PROTOCOLS) + 1) + "|"]
    for m in methods:
        cells = []
        for p in PROTOCOLS:
            r = results.get((m, p))
            cells.append("-" if r is None else f"{r['mean']['acc']:.3f} ({r['mean']['acc_norm']:.3f})")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    for p in PROTOCOLS:
        lines += ["", f"Per cluster, `{p}` (acc):", "",
                  "| method | " + " | ".join(clusters) + " |", "|---" * (len(clusters) + 1) + "|"]
        for m in methods:
            r = results.get((m, p))
            if r is None:
                continue
            lines.append(f"| {m} | " + " | ".join(
                f"{r['clusters'][c]['acc']:.3f}" if c in r["clusters"] else "-" for c in clusters) + " |")
    h = results.get(("hilora", "seen"))
    if h and h.get("routing"):
        lines += ["", f"HiLoRA routing in `seen`: own LoRA among the candidates "
                      f"{h['routing']['own_in_candidates']:.3f}, ranked first {h['routing']['own_first']:.3f}, "
                      f"mean candidates {h['routing']['mean_candidates']:.2f}."]
    lines += ["", "Selected tasks (dev gain of the own LoRA over zero-shot):", "",
              "| task | cluster | base (dev) | LoRA (dev) |", "|---|---|---|---|"]
    lines += [f"| {s['task']} | {s['cluster']} | {s['base_dev']:.2f} | {s['lora_dev']:.2f} |" for s in chosen]
    (res_dir / "results.md").write_text("\n".join(lines) + "\n")
    plot_results({(m, p): r for (m, p), r in results.items()},
                 save=res_dir / "accuracy_by_method.png")
    for name, rm in routing_maps.items():
        plot_routing_heatmap(np.asarray(rm["matrix"]), rm["tasks"], rm["loras"],
                             save=res_dir / f"routing_heatmap_{name}.png")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
