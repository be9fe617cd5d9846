"""BIG-bench domain-generalization benchmark on SmolLM2-135M-Instruct (method doc section 7).

One command (see README): screen candidate tasks, build the pool, and run every router under all
three protocols.

1. Candidates: BIG-bench JSON multiple-choice tasks with >= `--min-examples` examples, <= 5 choices
   and short inputs (p90 prompt+choice <= `--max-tokens`), up to `--per-family` subtasks per family.
   Cluster = the BIG-bench family when it gives >= 2 tasks (related subtasks), else a cluster
   proposed from the task's keywords (`eval.bigbench.propose_cluster`).
2. Splits (seeded, disjoint): `samples` (m = 20, HiLoRA's per-LoRA inputs), `test` (50),
   `dev` (32 carved from train plus up to `--n-holdout` 64 from beyond the train cap; never
   trained on), `train` (the rest, <= 256 used).
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

from hilora_jax.eval.runner import PROTOCOLS as _PROTOCOLS
from hilora_jax.routing.routers import ROUTERS as _ROUTERS

ROUTERS = list(_ROUTERS)  # the library's routers, in its order
PROTOCOLS = list(_PROTOCOLS)
MAX_TRAIN, N_SAMPLES, MAX_LEN = 256, 20, 256  # train items per LoRA, m, tokens per item
# reasoning-gym generators screened next to BIG-bench (short prompts, answers a LoRA can learn).
GYM_DEFAULT = ["gcd", "lcm", "products", "basic_arithmetic", "count_bits", "prime_factorization",
               "calendar_arithmetic", "fraction_simplification", "spell_backward",
               "letter_counting", "base_conversion", "syllogism", "family_relationships",
               "simple_equations", "complex_arithmetic"]


def log(*a):
    print("[bigbench_dg]", *a, file=sys.stderr, flush=True)


def find_candidates(root, tok, args):
    from hilora_jax.eval import bigbench as bb

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
        if _p90_tokens(exs, tok) > args.max_tokens:
            continue
        per_family[fam] += 1
        found.append((name, fam, bb.propose_cluster(t.keywords)))
    fams = defaultdict(int)
    for _, fam, _ in found:
        fams[fam] += 1
    return {name: (fam if fams[fam] >= 2 else kw) for name, fam, kw in found}


def _p90_tokens(exs, tok) -> float:
    """90th percentile of prompt + longest choice, in tokens, over <= 40 spread-out examples."""
    from hilora_jax.eval.tasks import choice_text, encode

    probe = exs[:: max(1, len(exs) // 40)][:40]
    lens = [len(encode(tok, e.prompt, special=True))
            + max(len(encode(tok, choice_text(c), special=False)) for c in e.choices)
            for e in probe]
    return float(np.percentile(lens, 90))


def gym_candidates(tok, args, size):
    """`{task: examples}` of the reasoning-gym generators in `--gym` whose p90 length fits."""
    from hilora_jax.eval import gym

    found = {}
    for name in filter(None, args.gym.split(",")):
        exs = gym.generate(name, size=size, seed=args.seed)
        if _p90_tokens(exs, tok) > args.max_tokens:
            log(f"reasoning-gym {name}: p90 length > {args.max_tokens} tokens, skipped")
            continue
        found[f"gym.{name}"] = exs
    return found


def screen_dev(eng, tok, cand_pool, dev, eval_dir):
    """Per task: dev accuracy of the base model and of the task's own LoRA (oracle).

    Cached per task in `eval_dir/screen_cache.json`, keyed by a fingerprint of the task's adapter
    and of its dev examples, so adding candidates only evaluates the new ones."""
    import hashlib

    from hilora_jax.eval.runner import (
        PrefixScorer,
        evaluate,
        first_adapted_layer,
        write_json_atomic,
    )
    from hilora_jax.routing import build_router
    from hilora_jax.routing.routers import pool_fingerprint

    by_task = defaultdict(list)
    for ex in dev:
        by_task[ex.task].append(ex)
    key = {}
    for task, exs in by_task.items():
        h = hashlib.sha1(pool_fingerprint(cand_pool.select([task])).encode())
        for ex in exs:
            h.update(json.dumps([ex.prompt, list(ex.choices), ex.answer]).encode())
        key[task] = h.hexdigest()[:16]
    path = Path(eval_dir) / "screen_cache.json"
    cache = json.loads(path.read_text()) if path.exists() else {}
    missing = sorted(t for t in by_task if cache.get(t, {}).get("key") != key[t])
    if missing:
        log(f"dev screen: evaluating {len(missing)} of {len(by_task)} tasks "
            f"({len(by_task) - len(missing)} cached)")
        sub = cand_pool.select(missing)
        sub_dev = [ex for t in missing for ex in by_task[t]]
        scorer = PrefixScorer(eng, first_adapted_layer(sub))
        cfg = {"pool_fp": pool_fingerprint(sub)}
        r = {name: evaluate(eng, tok, sub, build_router(name, sub), sub_dev, scorer=scorer,
                            progress=False, out=Path(eval_dir) / f"dev_{name}.json", config=cfg)
             for name in ("base", "oracle")}
        for t in missing:
            cache[t] = {"key": key[t], "cluster": by_task[t][0].cluster, "n": len(by_task[t]),
                        "base_dev": r["base"]["tasks"][t]["acc"],
                        "lora_dev": r["oracle"]["tasks"][t]["acc"]}
        write_json_atomic(path, cache)
    return [{"task": t, "cluster": cache[t]["cluster"], "base_dev": cache[t]["base_dev"],
             "lora_dev": cache[t]["lora_dev"],
             "gain": cache[t]["lora_dev"] - cache[t]["base_dev"]} for t in sorted(by_task)]


def add_split_args(p) -> None:
    """The candidate and split options (shared with `benchmarks/realistic_pool/run.py`)."""
    p.add_argument("--min-examples", type=int, default=200)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--per-family", type=int, default=8)
    p.add_argument("--max-candidates", type=int, default=48)
    p.add_argument("--n-test", type=int, default=50)
    p.add_argument("--n-dev", type=int, default=32)
    p.add_argument("--n-holdout", type=int, default=64,
                   help="extra dev items per task from beyond the train cap (where a task has them)")
    p.add_argument("--gym", default=",".join(GYM_DEFAULT),
                   help="reasoning-gym generators added as candidates (comma list; '' for none); "
                        "cluster = gym-<package>, e.g. gym-arithmetic")
    p.add_argument("--seed", type=int, default=0)


def prepare_splits(args, tok, data: Path, *, with_test: bool = True):
    """Candidates and their seeded splits under `data` (written once, reused while the candidate
    set is unchanged): `(train, dev, samples, test)` example lists, dev and test without over-long
    items. `args` needs the candidate and split options of `main` (`--min-examples`,
    `--max-tokens`, `--per-family`, `--max-candidates`, `--gym`, `--n-test`, `--n-dev`,
    `--n-holdout`, `--seed`). `with_test=False` does not read the test split (None). Also used by `benchmarks/realistic_pool/run.py`."""
    from hilora_jax.eval.bigbench import write_splits
    from hilora_jax.eval.tasks import load_tasks, write_jsonl
    from hilora_jax.io.assets import bigbench_tasks_dir

    root = bigbench_tasks_dir()
    cands = find_candidates(root, tok, args)
    names = list(cands)[: args.max_candidates]
    n_need = args.n_test + N_SAMPLES + MAX_TRAIN + args.n_dev + args.n_holdout
    gyms = gym_candidates(tok, args, size=n_need + 30) if args.gym else {}
    log(f"{len(cands)} BIG-bench candidate tasks; using {len(names)}; "
        f"{len(gyms)} reasoning-gym tasks")
    wanted = {n.replace("/", "."): cands[n] for n in names}
    wanted.update({t: exs[0].cluster for t, exs in gyms.items()})
    have = {}
    if (data / "manifest.json").exists() and (data / "dev.jsonl").exists():
        have = {k: v["cluster"] for k, v in json.loads((data / "manifest.json").read_text()).items()}
    if have != wanted or not (data / "holdout.jsonl").exists():
        # Splits are seeded per task, so a task keeps its split (and its cached LoRA stays valid)
        # when other candidates are added or a cluster label changes.
        log("writing splits" + (" (candidate set changed)" if have else ""))
        write_splits({n: cands[n] for n in names}, root, data, seed=args.seed,
                     n_samples=N_SAMPLES, n_test=args.n_test, max_train=MAX_TRAIN + args.n_dev,
                     n_holdout=args.n_holdout, extra=gyms)
        train, dev = split_dev(load_tasks(data / "train.jsonl"), args.n_dev, args.seed)
        write_jsonl(train, data / "train_fit.jsonl")
        write_jsonl(dev, data / "dev.jsonl")
    from hilora_jax.lora.build import fitting

    def fit(exs):  # drop the rare over-long items (p90 <= max-tokens, but outliers exist)
        by = defaultdict(list)
        for ex in exs:
            by[ex.task].append(ex)
        return [e for t in sorted(by) for e in fitting(by[t], tok, MAX_LEN)]

    train = load_tasks(data / "train_fit.jsonl")
    dev = fit(load_tasks(data / "dev.jsonl") + load_tasks(data / "holdout.jsonl"))
    samples, test = load_tasks(data / "samples.jsonl"), fit(load_tasks(data / "test.jsonl"))

    return train, dev, samples, test


def parse_variant(spec: str):
    """`LABEL=ROUTER[:k=v,k=v]` -> (label, router, options), e.g. `hilora-g1=hilora:gamma=1.0`."""
    label, sep, rest = spec.partition("=")
    if not sep or not label or not rest:
        raise SystemExit(f"--variant expects LABEL=ROUTER[:k=v,...], got {spec!r}")
    name, _, opts = rest.partition(":")
    options = {}
    for kv in filter(None, opts.split(",")):
        k, sep, v = kv.partition("=")
        if not sep:
            raise SystemExit(f"--variant {spec!r}: option {kv!r} is not k=v")
        options[k] = v
    return label, name, options


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
    add_split_args(p)
    p.add_argument("--top-layers", type=int, default=4)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--min-gain", type=float, default=0.15)
    p.add_argument("--routers", default=",".join(ROUTERS))
    p.add_argument("--variant", action="append", default=[], metavar="LABEL=ROUTER[:k=v,...]",
                   help="an extra configured router, e.g. hilora-g1=hilora:gamma=1.0 (repeatable)")
    p.add_argument("--stop-after", choices=["screen"], default=None,
                   help="stop after training and the dev screen (no routed evaluation)")
    p.add_argument("--report-only", action="store_true",
                   help="re-render results.md and the plots from --results/results.json")
    args = p.parse_args(argv)
    if args.report_only:
        print(render_report(args.results))
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from hilora_jax.eval.runner import (
        PrefixScorer,
        evaluate,
        first_adapted_layer,
        write_json_atomic,
    )
    from hilora_jax.inference import Engine
    from hilora_jax.io.loading import load_model, load_tokenizer
    from hilora_jax.lora import load_pool
    from hilora_jax.lora.build import build_task_pool
    from hilora_jax.routing import build_router
    from hilora_jax.routing.routers import RouterCache, pool_fingerprint

    t_start = time.time()
    out, res_dir = Path(args.out), Path(args.results)
    res_dir.mkdir(parents=True, exist_ok=True)
    model, tok = load_model(args.model), load_tokenizer(args.model)
    eng = Engine(model)
    L = model.config.num_layers

    # 1-2. candidates and splits ------------------------------------------------------------------
    train, dev, samples, test = prepare_splits(args, tok, out / "data")

    # 3. a LoRA per candidate --------------------------------------------------------------------
    layers = list(range(L - args.top_layers, L))
    t0 = time.time()
    build_task_pool(model, tok, train, samples, out / "candidates", base_name=str(args.model),
                    layers=layers, steps=args.steps, lr=args.lr, max_train=MAX_TRAIN,
                    max_len=MAX_LEN, seed=args.seed)
    t_train = time.time() - t0
    cand_pool = load_pool(out / "candidates" / "pool", model=model)

    # 4. selection on dev: oracle (own LoRA) vs base ------------------------------------------------
    screen = screen_dev(eng, tok, cand_pool, dev, out / "eval")
    chosen = [s for s in screen if s["gain"] >= args.min_gain]
    clusters = sorted({s["cluster"] for s in chosen})
    log(f"selected {len(chosen)} tasks in {len(clusters)} clusters (gain >= {args.min_gain} on dev)")
    write_json_atomic(res_dir / "screen.json", screen)
    if args.stop_after == "screen":
        for s in screen:
            log(f"  {s['task']:45s} {s['cluster']:18s} base {s['base_dev']:.2f} "
                f"LoRA {s['lora_dev']:.2f} gain {s['gain']:+.2f}")
        return 0
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
    pool_fp = pool_fingerprint(pool)  # stale partial records of another pool are not reused
    runs = [(n, n, {}) for n in args.routers.split(",") if n]
    runs += [parse_variant(v) for v in args.variant]
    route_cache = RouterCache()  # sample embeddings and fits shared by the variants
    for label, name, options in runs:
        router = build_router(name, pool, options=options, engine=eng, tokenizer=tok,
                              cache=route_cache)
        for proto in PROTOCOLS:
            if name in ("base",) and proto != "seen":
                results[(label, proto)] = results[(label, "seen")]
                continue
            if name == "oracle" and proto != "seen":
                continue  # the own LoRA is removed by definition
            log(f"evaluating {label} / {proto}")
            r = evaluate(eng, tok, pool, router, test_sel, protocol=proto, scorer=scorer,
                         progress=False, out=out / "eval" / f"{label}_{proto}.json",
                         config={"router": name, "router_options": options,
                                 "pool_fp": pool_fp})
            results[(label, proto)] = r
        if label in ("hilora", "retrieval"):
            routing_maps[label] = _routing_map(router, pool, test_sel)
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


def paired_differences(results, ref="hilora", against=None):
    """`{protocol: {baseline: {diff, se, n}}}`: mean per-item accuracy difference of `ref` minus
    each baseline on the same test items, with the standard error of the paired difference.
    `against`: default every router but `ref`, the base model and the oracle."""
    if against is None:
        against = tuple(r for r in ROUTERS if r not in (ref, "base", "oracle"))
    out = {}
    for proto in PROTOCOLS:
        r = results.get((ref, proto))
        if r is None or "correct" not in r:
            continue
        for b in against:
            o = results.get((b, proto))
            if o is None or "correct" not in o:
                continue
            keys = sorted(r["correct"])
            if keys != sorted(o["correct"]):
                raise ValueError(f"{ref} and {b} under {proto} were scored on different items")
            d = np.array([r["correct"][k] - o["correct"][k] for k in keys], np.float64)
            out.setdefault(proto, {})[b] = {"diff": float(d.mean()), "n": len(d),
                                            "se": float(d.std(ddof=1) / np.sqrt(len(d)))}
    return out


def _write_outputs(res_dir, results, routing_maps, pool, screen, chosen, args, timing):
    import platform

    from hilora_jax.eval.runner import write_json_atomic

    table = {f"{m}/{p}": {"mean": r["mean"], "clusters": r["clusters"], "tasks": r["tasks"],
                          "routing": r["routing"], "config": r.get("config", {}),
                          "timing": r.get("timing", {})}
             for (m, p), r in results.items()}
    meta = {"command": "python " + " ".join(sys.argv), "args": vars(args), "timing": timing,
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "pool": list(pool.names), "clusters": {n: pool.clusters[n] for n in pool.names}}
    write_json_atomic(res_dir / "results.json", {"meta": meta, "results": table, "screen": screen,
                                                 "selected": chosen,
                                                 "paired": paired_differences(results),
                                                 "routing_maps": routing_maps})
    print(render_report(res_dir))


def _methods(results) -> list[str]:
    """Method labels of `{(method, protocol): result}`: the method doc's order, then variants."""
    return sorted(dict.fromkeys(m for m, _ in results),
                  key=lambda m: (ROUTERS.index(m) if m in ROUTERS else len(ROUTERS), m))


def method_table(results) -> list[str]:
    """Markdown lines: methods x protocols (acc and acc_norm), then per cluster per protocol."""
    methods = _methods(results)
    clusters = sorted({c for r in results.values() for c in r["clusters"]})
    lines = ["Mean accuracy over test items (acc = summed log-prob of the choice; in parentheses "
             "acc_norm = per-token mean):", "",
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
    return lines


def paired_table(paired, ref: str = "HiLoRA") -> list[str]:
    """Markdown lines: `ref` minus each baseline per protocol, +- the paired standard error."""
    bl = sorted({b for v in paired.values() for b in v},
                key=lambda m: (ROUTERS.index(m) if m in ROUTERS else len(ROUTERS), m))
    lines = [f"{ref} minus each baseline on the same test items (acc; +- the standard error "
             "of the paired difference):", "",
             "| protocol | " + " | ".join(bl) + " |", "|---" * (len(bl) + 1) + "|"]
    for p in PROTOCOLS:
        if p in paired:
            lines.append(f"| {p} | " + " | ".join(
                f"{paired[p][b]['diff']:+.3f} +- {paired[p][b]['se']:.3f}" if b in paired[p]
                else "-" for b in bl) + " |")
    return lines


def render_report(res_dir) -> str:
    """`results.md` and the PNG plots from `results.json` (also: `run.py --report-only`)."""
    from hilora_jax.viz import plot_results, plot_routing_heatmap

    res_dir = Path(res_dir)
    doc = json.loads((res_dir / "results.json").read_text())
    meta, args = doc["meta"], doc["meta"]["args"]
    results = {tuple(k.split("/", 1)): r for k, r in doc["results"].items()}
    timing = meta["timing"]
    chosen = doc.get("selected") or [s for s in doc["screen"] if s["gain"] >= args["min_gain"]]
    methods = _methods(results)
    clusters = sorted({c for r in results.values() for c in r["clusters"]})
    base, oracle = results.get(("base", "seen")), results.get(("oracle", "seen"))
    n_items = base["mean"]["examples"] if base else "?"
    lines = [f"`{meta['command']}`", "",
             f"SmolLM2-135M-Instruct; {len(meta['pool'])} task LoRAs (r=8, q/v, top "
             f"{args['top_layers']} layers) in {len(clusters)} clusters; test: {n_items} items; "
             f"machine {meta['machine']}; train {timing['train_s']}s (0 = all cached), "
             f"eval {timing['eval_s']}s, total {timing['total_s']}s.", ""]
    lines += method_table(results)
    paired = doc.get("paired") or {}
    if paired:
        lines += [""] + paired_table(paired)
    h = results.get(("hilora", "seen"))
    if h and h.get("routing"):
        lines += ["", f"HiLoRA routing in `seen`: own LoRA among the candidates "
                      f"{h['routing']['own_in_candidates']:.3f}, ranked first {h['routing']['own_first']:.3f}, "
                      f"mean candidates {h['routing']['mean_candidates']:.2f}."]
    n_dev = f"{args['n_dev']} + up to {args.get('n_holdout', 0)}"
    lines += ["", f"Selected tasks: own LoRA vs zero-shot on **dev** ({n_dev} items, used for the "
                  f"selection) and on **test** ({args['n_test']} items, never used for selection):", "",
              "| task | cluster | base (dev) | LoRA (dev) | base (test) | LoRA (test) |",
              "|---|---|---|---|---|---|"]
    for s in chosen:
        bt = base["tasks"].get(s["task"], {}).get("acc") if base else None
        ot = oracle["tasks"].get(s["task"], {}).get("acc") if oracle else None
        fmt = (lambda v: "-" if v is None else f"{v:.2f}")
        lines.append(f"| {s['task']} | {s['cluster']} | {s['base_dev']:.2f} | {s['lora_dev']:.2f} "
                     f"| {fmt(bt)} | {fmt(ot)} |")
    text = "\n".join(lines) + "\n"
    (res_dir / "results.md").write_text(text)
    plot_results({(m, p): results[(m, p)] for m in methods for p in PROTOCOLS if (m, p) in results},
                 save=res_dir / "accuracy_by_method.png")
    for name, rm in doc.get("routing_maps", {}).items():
        plot_routing_heatmap(np.asarray(rm["matrix"]), rm["tasks"], rm["loras"],
                             save=res_dir / f"routing_heatmap_{name}.png")
    return text


if __name__ == "__main__":
    sys.exit(main())
