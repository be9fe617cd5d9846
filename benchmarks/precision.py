"""bf16 vs fp32 multiple-choice accuracy of `oracle` and `hilora` on the real SmolLM2-135M-Instruct
(issue 14 item 3, the SmolLM2 part).

Benchmark: the BIG-bench DG benchmark's pool (13 tasks in 7 clusters, `bigbench_dg/README.md`):
the same seeded splits and the same LoRAs (r=8, alpha 16, q/v, top 4 of 30 layers, 40 steps, lr
3e-3, seed 0, trained in float32) as `bigbench_dg/run.py`, rebuilt by `bigbench_dg/calib_dev.py`'s
`prepare` when no pool exists (an existing `artifacts/bigbench_dg/run/candidates/pool` is reused
read-only). The test split (50 items per task) is scored under the `seen` protocol with
`hilora_jax.eval.runner.evaluate`, once with the model and pool loaded in float32 and once in
bfloat16 (`load_model("smollm2", dtype=...)`, `load_pool(..., dtype=...)`); the router's MiniLM
embedder is the same in both. Everything else (prompts, batches, routers' options) is identical.

Per task and overall: accuracy in each dtype, and the per-item paired difference
`d_i = correct_bf16(i) - correct_fp32(i)` with its mean and standard error
`sd(d) / sqrt(n)` (items that flip either way), plus the number of items whose answer changed.

Usage:
  python benchmarks/precision.py prepare                 # splits + pool (cached under --work)
  python benchmarks/precision.py run [--tasks a,b] [--items N] [--routers oracle,hilora]
Outputs: benchmarks/results/precision.{json,md} (`--out`).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from argparse import Namespace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "bigbench_dg"))
import common  # noqa: E402

REPO = HERE.parent
EXISTING = REPO / "artifacts" / "bigbench_dg" / "run"
DTYPES = ("float32", "bfloat16")


def log(*a):
    print("[precision]", *a, file=sys.stderr, flush=True)


def find_pool(work: Path) -> tuple[Path, Path]:
    """(data dir with test.jsonl, pool dir): the benchmark's own if it exists, else ours."""
    for data, pool in ((EXISTING / "data", EXISTING / "candidates" / "pool"),
                       (work / "data", work / "pool_build" / "pool")):
        if (data / "test.jsonl").exists() and pool.exists():
            return data, pool
    raise SystemExit(f"precision: no pool found under {EXISTING} or {work}; run "
                     f"`python benchmarks/precision.py prepare --work {work}` first")


def prepare(work: Path, tasks: list[str] | None = None) -> None:
    """Write the 13 pool tasks' splits exactly as `calib_dev.prepare` does, keeping the test split,
    then train the pool with `calib_dev.prepare` (which reuses existing splits); with `tasks`,
    only those tasks' LoRAs, same recipe."""
    import calib_dev
    from run import MAX_LEN, MAX_TRAIN, N_SAMPLES, split_dev

    from hilora_jax.eval import gym
    from hilora_jax.eval.bigbench import write_splits
    from hilora_jax.eval.tasks import load_tasks, write_jsonl
    from hilora_jax.io.assets import bigbench_tasks_dir

    data = work / "data"
    if not (data / "dev.jsonl").exists():
        n_dev, n_holdout, n_test = 32, 64, 50
        n_need = n_test + N_SAMPLES + MAX_TRAIN + n_dev + n_holdout
        gyms = {f"gym.{g}": gym.generate(g, size=n_need + 30, seed=0) for g in calib_dev.POOL_GYM}
        write_splits(calib_dev.POOL_TASKS, bigbench_tasks_dir(), data, seed=0,
                     n_samples=N_SAMPLES, n_test=n_test, max_train=MAX_TRAIN + n_dev,
                     n_holdout=n_holdout, extra=gyms)
        train, dev = split_dev(load_tasks(data / "train.jsonl"), n_dev, 0)
        write_jsonl(train, data / "train_fit.jsonl")
        write_jsonl(dev, data / "dev.jsonl")
    if tasks is None:
        calib_dev.prepare(Namespace(out=str(work)))
        return
    # a subset of the pool (CPU time): the same recipe as calib_dev.prepare, on those tasks only
    from hilora_jax.io.loading import load_model, load_tokenizer
    from hilora_jax.lora.build import build_task_pool

    train = [e for e in load_tasks(data / "train_fit.jsonl") if e.task in tasks]
    samples = [e for e in load_tasks(data / "samples.jsonl") if e.task in tasks]
    missing = sorted(set(tasks) - {e.task for e in train})
    if missing:
        raise SystemExit(f"precision: --tasks {missing} are not pool tasks of the benchmark")
    model, tok = load_model("smollm2"), load_tokenizer("smollm2")
    L = model.config.num_layers
    build_task_pool(model, tok, train, samples, work / "pool_build", base_name="smollm2",
                    layers=list(range(L - 4, L)), steps=40, lr=3e-3, max_train=MAX_TRAIN,
                    max_len=MAX_LEN, seed=0)


def calib_pool_tasks() -> list[str]:
    """The benchmark pool's task names (`calib_dev.POOL_TASKS` + its reasoning-gym tasks)."""
    import calib_dev

    return [t.replace("/", ".") for t in calib_dev.POOL_TASKS] + [f"gym.{g}"
                                                                   for g in calib_dev.POOL_GYM]


def logprob_drift(fp32_partial: Path, bf16_partial: Path, keys) -> dict:
    """Per-item choice log-probs of the two runs (the per-example records `evaluate` appends to
    `<out>.partial.jsonl`; the last record of a key is this run's): prediction agreement (argmax
    of summed log-probs, right or wrong) and |bf16 - fp32| of the choices' summed log-probs."""
    import json

    import numpy as np

    def read(path):
        recs = {}
        for line in path.read_text().splitlines():
            r = json.loads(line)
            recs[r["key"]] = r
        return recs

    a, b = read(fp32_partial), read(bf16_partial)
    missing = [k for k in keys if k not in a or k not in b]
    if missing:
        raise ValueError(f"per-item records missing for {missing[:3]} in {fp32_partial.parent}")
    agree, diffs, margin = [], [], []
    for k in keys:
        la, lb = np.asarray(a[k]["logprob"]), np.asarray(b[k]["logprob"])
        agree.append(int(np.argmax(la) == np.argmax(lb)))
        diffs.append(np.abs(lb - la))
        sa = np.sort(la)[::-1]
        margin.append(sa[0] - sa[1])
    d = np.concatenate(diffs)
    return {"items": len(keys), "prediction_agreement": float(np.mean(agree)),
            "mean_abs_logprob_diff": float(d.mean()), "p95_abs_logprob_diff":
            float(np.percentile(d, 95)), "max_abs_logprob_diff": float(d.max()),
            "median_fp32_top2_margin": float(np.median(margin))}


def paired(a: dict[str, int], b: dict[str, int]) -> dict:
    """Paired difference b - a over the common item keys: mean, standard error, flips."""
    import numpy as np

    keys = sorted(set(a) & set(b))
    if set(a) != set(b):
        raise ValueError(f"paired difference: item sets differ ({len(a)} vs {len(b)} items)")
    d = np.asarray([b[k] - a[k] for k in keys], np.float64)
    n = len(d)
    se = float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return {"n": n, "acc_a": float(np.mean([a[k] for k in keys])),
            "acc_b": float(np.mean([b[k] for k in keys])), "diff": float(d.mean()), "se": se,
            "gained": int((d > 0).sum()), "lost": int((d < 0).sum())}


def select(args, prog: str):
    """The pool, tokenizer, tasks, routers and test items a precision run compares on (checked
    before any model loads): `(pool_dir, tok, names, tasks, routers, items)`."""
    from hilora_jax import load_pool, load_tokenizer
    from hilora_jax.eval.tasks import load_tasks

    data, pool_dir = find_pool(Path(args.work))
    test = load_tasks(data / "test.jsonl")
    tok = load_tokenizer("smollm2")
    names = set(load_pool(pool_dir, progress=False).names)
    tasks = sorted(names) if not args.tasks else args.tasks.split(",")
    bad = [t for t in tasks if t not in names]
    if bad:
        raise SystemExit(f"{prog}: --tasks {','.join(bad)} not in the pool ({sorted(names)})")
    routers = args.routers.split(",")
    bad = [r for r in routers if r not in ("oracle", "hilora")]
    if bad:
        raise SystemExit(f"{prog}: --routers {bad}: choose from oracle,hilora")
    by = {t: [e for e in test if e.task == t] for t in tasks}
    sel = [e for t in tasks for e in by[t][: args.items or None]]
    log(f"{len(sel)} test items from {len(tasks)} tasks; routers {routers}; pool {pool_dir}")
    return pool_dir, tok, names, tasks, routers, sel


def evaluate_arm(arm: str, model, pool, tok, routers, sel, evals: Path, batch_size: int,
                 config: dict, results: dict, timing: dict, resumed: dict,
                 router_options: dict | None = None) -> None:
    """Every router of `routers` on `sel` (`seen`) with `model` + `pool` (and `router_options`),
    into `results[(arm, router)]` (per-item records cached under `evals/<arm>_<router>.json`)."""
    from hilora_jax.eval.runner import PrefixScorer, evaluate, first_adapted_layer
    from hilora_jax.inference import Engine
    from hilora_jax.routing import build_router

    eng = Engine(model)
    scorer = PrefixScorer(eng, first_adapted_layer(pool))
    for name in routers:
        router = build_router(name, pool, options=router_options, engine=eng, tokenizer=tok)
        t0 = time.perf_counter()
        r = evaluate(eng, tok, pool, router, sel, protocol="seen", scorer=scorer,
                     batch_size=batch_size, progress=False, out=evals / f"{arm}_{name}.json",
                     config=config)
        timing[f"{arm}/{name}"] = time.perf_counter() - t0
        resumed[f"{arm}/{name}"] = r["timing"]["resumed_examples"]
        results[(arm, name)] = r
        log(f"{arm} {name}: acc {r['mean']['acc']:.3f} ({timing[f'{arm}/{name}']:.0f}s)")


def compare(results: dict, a: str, b: str, routers, tasks, evals: Path):
    """Arm `b` against arm `a` per router: the paired table rows, the per-task paired stats and
    the per-choice log-prob drift (with its markdown lines)."""
    table, out_rows = [], {}
    for name in routers:
        ra, rb = results[(a, name)], results[(b, name)]
        rows = {}
        for t in tasks:
            ca = {k: v for k, v in ra["correct"].items() if k.rsplit(":", 1)[0] == t}
            cb = {k: v for k, v in rb["correct"].items() if k.rsplit(":", 1)[0] == t}
            rows[t] = paired(ca, cb)
        rows["ALL"] = paired(ra["correct"], rb["correct"])
        out_rows[name] = rows
        for t, p in rows.items():
            table.append([name, t, p["n"], f"{p['acc_a']:.3f}", f"{p['acc_b']:.3f}",
                          f"{p['diff']:+.3f}", f"{p['se']:.3f}", f"{p['gained']}/{p['lost']}"])
    drift = {name: logprob_drift(evals / f"{a}_{name}.json.partial.jsonl",
                                 evals / f"{b}_{name}.json.partial.jsonl",
                                 sorted(results[(a, name)]["correct"]))
             for name in routers}
    drift_md = "\n".join(
        f"- {n}: predictions agree on {v['prediction_agreement']:.1%} of {v['items']} items; "
        f"|logprob {b} - {a}| per choice mean {v['mean_abs_logprob_diff']:.3f}, p95 "
        f"{v['p95_abs_logprob_diff']:.3f}, max {v['max_abs_logprob_diff']:.3f} nats (median {a} "
        f"top-2 margin {v['median_fp32_top2_margin']:.2f})" for n, v in drift.items())
    return table, out_rows, drift, drift_md


def run(args) -> int:
    t_start = time.perf_counter()
    import jax.numpy as jnp

    from hilora_jax import load_model, load_pool
    from hilora_jax.lora.pool import LoraPool

    pool_dir, tok, names, tasks, routers, sel = select(args, "precision")
    evals = Path(args.work) / "eval"
    results: dict = {}
    timing: dict = {}
    resumed: dict = {}
    for dt in DTYPES:
        dtype = jnp.dtype(dt)
        model = load_model("smollm2", dtype=dtype, progress=False)
        pool = load_pool(pool_dir, model=model, dtype=dtype, progress=False)
        if str(next(iter(pool.arrays.A.values())).dtype) != dt:  # a saved pool dir keeps its dtype
            arrays = pool.arrays.replace(
                A={m: v.astype(dtype) for m, v in pool.arrays.A.items()},
                B={m: v.astype(dtype) for m, v in pool.arrays.B.items()})
            pool = LoraPool(arrays, pool.names, clusters=pool.clusters, samples=pool.samples,
                            sources=pool.sources, configs=pool.configs)
        evaluate_arm(dt, model, pool, tok, routers, sel, evals, args.batch_size,
                     {"dtype": dt, "pool_dir": str(pool_dir)}, results, timing, resumed)
        del model, pool

    table, out_rows, drift, drift_md = compare(results, "float32", "bfloat16", routers, tasks, evals)

    cmd = common.command_line()
    machine = common.machine_info()
    md_table = common.markdown_table(
        ["router", "task", "items", "acc fp32", "acc bf16", "bf16 - fp32", "SE (paired)",
         "items gained/lost"], table)
    subset = ("all pool tasks" if len(tasks) == len(names) else f"tasks {tasks}") + (
        f", first {args.items} test items per task" if args.items else ", all 50 test items")
    full = len(calib_pool_tasks())
    pool_txt = (f"the BIG-bench DG pool ({full} LoRAs, r=8 q/v)" if len(names) == full else
                f"a {len(names)}-LoRA subset of the BIG-bench DG pool's {full} (r=8 q/v, same "
                f"recipe; `prepare --tasks`): {sorted(names)}")
    md = (f"`{cmd}`\n\nSmolLM2-135M-Instruct, {pool_txt}, "
          f"`seen` protocol, test split: {subset} ({len(sel)} items). Model and pool in float32 vs "
          f"bfloat16 (same MiniLM router embedder). Paired difference d = correct(bf16) - "
          f"correct(fp32) per item; SE = sd(d)/sqrt(n). {machine['cpu_model']}, "
          f"{machine['usable_cores']} cores, jax {machine['versions'].get('jax')}; "
          f"eval seconds {({k: round(v) for k, v in timing.items()})} (examples resumed from cached "
          f"per-item records: {resumed}).\n\n{md_table}\n\n"
          f"Summed choice log-probs, bf16 vs fp32 (per item, all choices):\n\n{drift_md}\n")
    return write_report("precision", args, md, results, DTYPES, routers, tasks, out_rows, drift,
                        {"subset": subset, "pool_description": pool_txt, "items": len(sel),
                         "pool_dir": str(pool_dir),
                         "pool": sorted(names), "machine": machine, "eval_s": timing,
                         "resumed_examples": resumed}, t_start)


def write_report(name: str, args, md: str, results: dict, arms, routers, tasks, paired_rows,
                 drift, extra: dict, t_start: float) -> int:
    """Print `md` and write `results/<name>.{json,md}` (or `--out`): settings, per-arm accuracy,
    paired differences, log-prob drift and per-item correctness, plus `extra`."""
    print(md)
    payload = {"benchmark": name, "command": common.command_line(),
               "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "settings": vars(args), **extra,
               "accuracy": {f"{a}/{n}": {"mean": results[(a, n)]["mean"],
                                         "tasks": {t: results[(a, n)]["tasks"][t]["acc"]
                                                   for t in tasks}}
                            for a in arms for n in routers},
               "paired": paired_rows, "logprob_drift": drift,
               "correct": {f"{a}/{n}": results[(a, n)]["correct"] for a in arms for n in routers},
               "total_wall_s": time.perf_counter() - t_start, "markdown": md}
    out = Path(args.out) if args.out else common.RESULTS_DIR / f"{name}.json"
    path = common.write_json(out, payload)
    common.write_text(path.with_suffix(".md"), md)
    log(f"wrote {path} and {path.with_suffix('.md')}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["prepare", "run"])
    p.add_argument("--work", default=str(REPO / "artifacts" / "precision"),
                   help="cache dir for splits, pool and partial evaluations")
    p.add_argument("--tasks", default=None, help="comma-separated pool tasks (default: all)")
    p.add_argument("--items", type=int, default=0, help="test items per task (0 = all 50)")
    p.add_argument("--routers", default="oracle,hilora")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", default=None, help="JSON path (default results/precision.json)")
    args = p.parse_args(argv)
    if args.items < 0:
        p.error("--items must be >= 0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.stage == "prepare":
        prepare(Path(args.work), args.tasks.split(",") if args.tasks else None)
        return 0
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
