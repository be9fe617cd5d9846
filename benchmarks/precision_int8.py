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

The fp32 arm is `precision.py`'s `float32` arm (same configuration, same per-item record files
under `<work>/eval`), so after `precision.py run` on the same items its records are resumed, not
recomputed; the int8 arms' records sit beside them.

`--int4` adds a weight-only int4 arm (`weights="int4"`), compared with fp32 in its own table.

`--pack` adds a third arm, `int8pack`: the int8 model with the hilora router's packed ROCs in int8
too (`pack_weights="int8"`, a float32 scale per ROC; `hilora aot --pack-weights int8`), compared
with `int8` (the pack's quantisation alone) and with `fp32`; only routers that read the pack
(`hilora`) are run. Outputs: results/precision_int8_pack.{json,md}.
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
from precision import REPO, compare, evaluate_arm, select, write_report  # noqa: E402

ARMS = ("float32", "int8")  # "float32": precision.py's arm
PACK_ARM = "int8pack"


def run(args) -> int:
    t_start = time.perf_counter()
    import jax.numpy as jnp
    from flax import nnx

    from hilora_jax import load_model, load_pool

    pool_dir, tok, names, tasks, routers, sel = select(args, "precision_int8")
    if args.pack and routers != ["hilora"]:
        raise SystemExit("precision_int8: --pack compares the hilora router only (--routers hilora)")
    evals = Path(args.work) / "eval"
    results: dict = {}
    timing: dict = {}
    weight_bytes: dict = {}
    resumed: dict = {}
    extra = ((PACK_ARM,) if args.pack else ()) + (("int4",) if args.int4 else ())
    for arm in ARMS + extra:
        model = load_model("smollm2", dtype=jnp.float32, progress=False,
                           weights={"float32": None, "int4": "int4"}.get(arm, "int8"))
        weight_bytes[arm] = int(sum(v.nbytes for _, v in nnx.to_flat_state(nnx.state(model))))
        pool = load_pool(pool_dir, model=model, dtype=jnp.float32, progress=False)
        opts = {"pack_weights": "int8"} if arm == PACK_ARM else None
        config = ({"dtype": "float32", "pool_dir": str(pool_dir)} if arm == "float32" else
                  {"weights": arm, "pool_dir": str(pool_dir)})  # float32: precision.py's config
        evaluate_arm(arm, model, pool, tok, routers, sel, evals, args.batch_size, config, results,
                     timing, resumed, router_options=opts)
        del model, pool
    if args.pack:
        return report_pack(args, results, routers, tasks, evals, names, sel, timing, resumed,
                           t_start)

    table, out_rows, drift, drift_md = compare(results, "float32", "int8", routers, tasks, evals)
    machine = common.machine_info()
    md_table = common.markdown_table(
        ["router", "task", "items", "acc fp32", "acc int8", "int8 - fp32", "SE (paired)",
         "items gained/lost"], table)
    subset, head = header(args, names, tasks, sel)
    md = (f"{head}. Model in float32 vs weight-only int8 base kernels "
          f"(per-output-channel scales; embeddings, norms, pool and activations float32). Model "
          f"parameter bytes fp32 {weight_bytes['float32'] / 2**20:.1f} MiB, int8 "
          f"{weight_bytes['int8'] / 2**20:.1f} MiB (the tied 49152x576 embedding stays fp32). "
          f"Paired difference d = correct(int8) - correct(fp32) per item; SE = sd(d)/sqrt(n). "
          f"{machine['cpu_model']}, {machine['usable_cores']} cores, jax "
          f"{machine['versions'].get('jax')}; eval seconds "
          f"{({k: round(v) for k, v in timing.items()})} (examples resumed from cached per-item "
          f"records: {resumed}).\n\n{md_table}\n\n"
          f"Summed choice log-probs, int8 vs fp32 (per item, all choices):\n\n{drift_md}\n")
    paired_rows, drifts = out_rows, drift
    if args.int4:  # int4 (4-bit codes, float16 scale + min per 32 inputs) against the same fp32
        table4, rows4, drift4, drift_md4 = compare(results, "float32", "int4", routers, tasks,
                                                   evals)
        md += (f"\n### int4 vs fp32\n\nModel with weight-only int4 base kernels (parameter bytes "
               f"{weight_bytes['int4'] / 2**20:.1f} MiB as stored here: XLA:CPU keeps a byte per "
               f"4-bit code). The GGUF's projections are Q4_1, whose grid int4 keeps exactly, so "
               f"the weights equal the fp32 model's; differences come from the matmul's rounding "
               f"order only.\n\n" + common.markdown_table(
                   ["router", "task", "items", "acc fp32", "acc int4", "int4 - fp32",
                    "SE (paired)", "items gained/lost"], table4)
               + f"\n\nSummed choice log-probs, int4 vs fp32:\n\n{drift_md4}\n")
        paired_rows, drifts = {"int8": out_rows, "int4": rows4}, {"int8": drift, "int4": drift4}
    return write_report("precision_int8", args, md, results, ARMS + (("int4",) if args.int4
                                                                      else ()),
                        routers, tasks, paired_rows, drifts,
                        {"subset": subset, "items": len(sel), "pool_dir": str(pool_dir),
                         "pool": sorted(names), "machine": machine, "eval_s": timing,
                         "resumed_examples": resumed, "param_bytes": weight_bytes}, t_start)


def header(args, names, tasks, sel) -> tuple[str, str]:
    """(the test-subset phrase, the report's opening: command line, model, pool, protocol,
    items), shared by both reports."""
    subset = ("all pool tasks" if len(tasks) == len(names) else f"tasks {tasks}") + (
        f", first {args.items} test items per task" if args.items else ", all 50 test items")
    head = (f"`{common.command_line()}`\n\nSmolLM2-135M-Instruct, pool {sorted(names)} (r=8 q/v, "
            f"`benchmarks/precision.py prepare`), `seen` protocol, test split: {subset} "
            f"({len(sel)} items)")
    return subset, head


def report_pack(args, results, routers, tasks, evals, names, sel, timing, resumed,
                t_start) -> int:
    """The `--pack` report: int8pack vs int8 and vs fp32 (paired), log-prob drift of each."""
    md_parts, rows, drifts = [], {}, {}
    for a in ("int8", "float32"):
        table, out_rows, drift, drift_md = compare(results, a, PACK_ARM, routers, tasks, evals)
        rows[a], drifts[a] = out_rows, drift
        md_parts.append(f"### int8pack vs {a}\n\n" + common.markdown_table(
            ["router", "task", "items", f"acc {a}", "acc int8pack", f"int8pack - {a}",
             "SE (paired)", "items gained/lost"], table)
            + f"\n\nSummed choice log-probs, int8pack vs {a}:\n\n{drift_md}\n")
    machine = common.machine_info()
    subset, head = header(args, names, tasks, sel)
    md = (f"{head}, router hilora. Arms: float32; int8 (weight-only int8 base kernels, "
          f"LoRA pool float32); int8pack (int8 base kernels and the hilora router's packed ROCs "
          f"in int8 with a float32 scale per ROC, `pack_weights=int8`). Paired difference per "
          f"item, SE = sd(d)/sqrt(n). {machine['cpu_model']}, {machine['usable_cores']} cores; "
          f"eval seconds {({k: round(v) for k, v in timing.items()})} (resumed: {resumed}).\n\n"
          + "\n".join(md_parts))
    if args.out is None:
        args.out = str(common.RESULTS_DIR / "precision_int8_pack.json")
    return write_report("precision_int8_pack", args, md, results, ARMS + (PACK_ARM,), routers,
                        tasks, rows, drifts, {"subset": subset, "items": len(sel),
                                              "pool": sorted(names), "machine": machine,
                                              "eval_s": timing, "resumed_examples": resumed},
                        t_start)


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
    p.add_argument("--pack", action="store_true", help="add the int8pack arm (hilora only)")
    p.add_argument("--int4", action="store_true", help="add a weight-only int4 arm (vs fp32)")
    args = p.parse_args(argv)
    if args.items < 0:
        p.error("--items must be >= 0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
