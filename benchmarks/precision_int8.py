"""Weight-only int8 vs fp32 multiple-choice accuracy of `oracle` and `hilora` on the real
SmolLM2-135M-Instruct (issue 14 item 4, accuracy drift).

The same benchmark, splits, pool, protocol and statistics as `benchmarks/precision.py` (read its
docstring; `python benchmarks/precision.py prepare --tasks ...` builds the pool), with the two arms
  fp32: `load_model("smollm2", dtype=float32)`
  int8: `load_model("smollm2", dtype=float32, weights="int8")` (every base projection kernel int8
        with per-output-channel scales; embeddings (tied LM head), norms, LoRA pool and
        activations float32), so the difference is the weight quantisation alone.
The GGUF's Q8_0 tensors are dequantised on load, then requantised per channel (not exact; see
`hilora_jax.model.quant`). Per task and overall: accuracy in each arm and the per-item paired
difference d_i = correct_int8(i) - correct_fp32(i) with its standard error sd(d)/sqrt(n), plus the
per-choice log-prob drift.

  python benchmarks/precision_int8.py [--tasks a,b] [--items N] [--routers oracle,hilora]
Outputs: benchmarks/results/precision_int8.{json,md} (`--out`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402
from precision import REPO, find_pool, log, logprob_drift, paired  # noqa: E402

ARMS = ("fp32", "int8")


def run(args) -> int:
    t_start = time.perf_counter()
    import jax.numpy as jnp

    from hilora_jax import load_model, load_pool, load_tokenizer
    from hilora_jax.eval.runner import PrefixScorer, evaluate, first_adapted_layer
    from hilora_jax.eval.tasks import load_tasks
    from hilora_jax.inference import Engine
    from hilora_jax.routing import build_router

    work = Path(args.work)
    data, pool_dir = find_pool(work)
    test = load_tasks(data / "test.jsonl")
    tok = load_tokenizer("smollm2")
    probe = load_pool(pool_dir, progress=False)
    names = set(probe.names)
    tasks = sorted(names) if not args.tasks else args.tasks.split(",")
    bad = [t for t in tasks if t not in names]
    if bad:
        raise SystemExit(f"precision_int8: --tasks {','.join(bad)} not in the pool "
                         f"({sorted(names)})")
    routers = args.routers.split(",")
    bad = [r for r in routers if r not in ("oracle", "hilora")]
    if bad:
        raise SystemExit(f"precision_int8: --routers {bad}: choose from oracle,hilora")
    by = {t: [e for e in test if e.task == t] for t in tasks}
    sel = [e for t in tasks for e in by[t][: args.items or None]]
    log(f"{len(sel)} test items from {len(tasks)} tasks; routers {routers}; pool {pool_dir}")
    del probe

    evals = work / "eval_int8"
    results: dict = {}
    timing: dict = {}
    weight_bytes: dict = {}
    for arm in ARMS:
        model = load_model("smollm2", dtype=jnp.float32, progress=False,
                           weights="int8" if arm == "int8" else None)
        from flax import nnx

        weight_bytes[arm] = int(sum(v.nbytes for _, v in nnx.to_flat_state(nnx.state(model))))
        pool = load_pool(pool_dir, model=model, dtype=jnp.float32, progress=False)
        eng = Engine(model)
        scorer = PrefixScorer(eng, first_adapted_layer(pool))
        for name in routers:
            router = build_router(name, pool, engine=eng, tokenizer=tok)
            t0 = time.perf_counter()
            r = evaluate(eng, tok, pool, router, sel, protocol="seen", scorer=scorer,
                         batch_size=args.batch_size, progress=False,
                         out=evals / f"{arm}_{name}.json",
                         config={"weights": arm, "pool_dir": str(pool_dir)})
            timing[f"{arm}/{name}"] = time.perf_counter() - t0
            results[(arm, name)] = r
            log(f"{arm} {name}: acc {r['mean']['acc']:.3f} ({timing[f'{arm}/{name}']:.0f}s)")
        del model, pool, eng, scorer

    table, out_rows = [], {}
    for name in routers:
        a, b = results[("fp32", name)], results[("int8", name)]
        rows = {}
        for t in tasks:
            ca = {k: v for k, v in a["correct"].items() if k.rsplit(":", 1)[0] == t}
            cb = {k: v for k, v in b["correct"].items() if k.rsplit(":", 1)[0] == t}
            rows[t] = paired(ca, cb)
        rows["ALL"] = paired(a["correct"], b["correct"])
        out_rows[name] = rows
        for t, p in rows.items():
            table.append([name, t, p["n"], f"{p['acc_a']:.3f}", f"{p['acc_b']:.3f}",
                          f"{p['diff']:+.3f}", f"{p['se']:.3f}", f"{p['gained']}/{p['lost']}"])
    drift = {name: logprob_drift(evals / f"fp32_{name}.json.partial.jsonl",
                                 evals / f"int8_{name}.json.partial.jsonl",
                                 sorted(results[("fp32", name)]["correct"]))
             for name in routers}
    drift_md = "\n".join(
        f"- {n}: predictions agree on {v['prediction_agreement']:.1%} of {v['items']} items; "
        f"|logprob int8 - fp32| per choice mean {v['mean_abs_logprob_diff']:.3f}, p95 "
        f"{v['p95_abs_logprob_diff']:.3f}, max {v['max_abs_logprob_diff']:.3f} nats (median fp32 "
        f"top-2 margin {v['median_fp32_top2_margin']:.2f})" for n, v in drift.items())
    cmd = common.command_line()
    machine = common.machine_info()
    md_table = common.markdown_table(
        ["router", "task", "items", "acc fp32", "acc int8", "int8 - fp32", "SE (paired)",
         "items gained/lost"], table)
    subset = f"tasks {tasks}" + (f", first {args.items} test items per task" if args.items
                                 else ", all 50 test items")
    md = (f"`{cmd}`\n\nSmolLM2-135M-Instruct, pool {sorted(names)} (r=8 q/v, "
          f"`benchmarks/precision.py prepare`), `seen` protocol, test split: {subset} "
          f"({len(sel)} items). Model in float32 vs weight-only int8 base kernels "
          f"(per-output-channel scales; embeddings, norms, pool and activations float32). Model "
          f"parameter bytes fp32 {weight_bytes['fp32'] / 2**20:.1f} MiB, int8 "
          f"{weight_bytes['int8'] / 2**20:.1f} MiB (the tied 49152x576 embedding stays fp32). "
          f"Paired difference d = correct(int8) - correct(fp32) per item; SE = sd(d)/sqrt(n). "
          f"{machine['cpu_model']}, {machine['usable_cores']} cores, jax "
          f"{machine['versions'].get('jax')}; eval seconds "
          f"{({k: round(v) for k, v in timing.items()})}.\n\n{md_table}\n\n"
          f"Summed choice log-probs, int8 vs fp32 (per item, all choices):\n\n{drift_md}\n")
    print(md)
    payload = {"benchmark": "precision_int8", "command": cmd,
               "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "settings": vars(args),
               "subset": subset, "items": len(sel), "pool_dir": str(pool_dir),
               "pool": sorted(names), "machine": machine, "eval_s": timing,
               "param_bytes": weight_bytes,
               "accuracy": {f"{arm}/{n}": {"mean": results[(arm, n)]["mean"],
                                           "tasks": {t: results[(arm, n)]["tasks"][t]["acc"]
                                                     for t in tasks}}
                            for arm in ARMS for n in routers},
               "paired": out_rows, "logprob_drift": drift,
               "correct": {f"{arm}/{n}": results[(arm, n)]["correct"] for arm in ARMS
                           for n in routers},
               "total_wall_s": time.perf_counter() - t_start, "markdown": md}
    out = Path(args.out) if args.out else common.RESULTS_DIR / "precision_int8.json"
    path = common.write_json(out, payload)
    common.write_text(path.with_suffix(".md"), md)
    log(f"wrote {path} and {path.with_suffix('.md')}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=str(REPO / "artifacts" / "precision"),
                   help="the precision benchmark's cache dir (splits, pool, partial evaluations)")
    p.add_argument("--tasks", default=None, help="comma-separated pool tasks (default: all)")
    p.add_argument("--items", type=int, default=25, help="test items per task (0 = all 50)")
    p.add_argument("--routers", default="oracle,hilora")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", default=None, help="JSON path (default results/precision_int8.json)")
    args = p.parse_args(argv)
    if args.items < 0:
        p.error("--items must be >= 0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
