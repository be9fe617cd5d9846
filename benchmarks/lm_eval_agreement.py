"""`hilora eval` vs `lm_eval --model hilora` on the BIG-bench DG benchmark's test items.

Both command lines run on the same task file: `hilora eval --tasks test.jsonl` (our runner) and,
after `hilora_jax.eval.lmeval_tasks.convert_tasks`, lm-eval's own CLI through
`python -m hilora_jax.lmeval run --model hilora ... --log_samples`. Per item, correctness (argmax
of the summed choice log-prob = lm-eval's `acc`) must agree; per task, so must the accuracy.

    python benchmarks/lm_eval_agreement.py                 # the 13 DG tasks x 50 test items
    python benchmarks/lm_eval_agreement.py --per-task 5    # a quick look

The items are the DG benchmark's test split (`benchmarks/bigbench_dg/run.py`'s `prepare_splits`,
seeded per task, written under `--data`), restricted to the tasks the benchmark selected
(`benchmarks/bigbench_dg/results/results.json`). The pool is a folder of PEFT adapters (default:
the realistic pool's trained SmolLM2 adapters in ~/.cache/hilora, when present); the DG pool
itself is rebuilt only by `make bench-dg`. `hilora eval` always needs a pool; routers `base` and
`uniform` (every adapter mixed in) need nothing else.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def real_adapters(dest: Path) -> Path | None:
    """A folder of symlinks to the finished realistic-pool adapters (those with their training
    record written), or None when there are none."""
    src = Path.home() / ".cache" / "hilora" / "realistic_pool" / "adapters"
    done = sorted(p for p in src.glob("*") if (p / "hilora_train.json").exists()
                  and (p / "adapter_model.safetensors").exists()) if src.is_dir() else []
    if not done:
        return None
    dest.mkdir(parents=True, exist_ok=True)
    for p in done:
        link = dest / p.name
        if not link.exists():
            link.symlink_to(p, target_is_directory=True)
    return dest


def agreement(examples, *, model: str, pool: str, router: str, work: Path,
              batch_size: int = 8) -> dict:
    """Run both command lines on `examples` and compare per item and per task."""
    from hilora_jax import cli, lmeval
    from hilora_jax.eval.lmeval_tasks import convert_tasks
    from hilora_jax.eval.tasks import write_jsonl

    work.mkdir(parents=True, exist_ok=True)
    tasks = write_jsonl(examples, work / "tasks.jsonl")
    t0 = time.perf_counter()
    rc = cli.main(["eval", "--model", model, "--pool", str(pool), "--router", router,
                   "--tasks", str(tasks), "--out", str(work / f"hilora_eval_{router}.json"),
                   "--batch-size", str(batch_size), "--no-resume"])
    if rc != 0:
        raise RuntimeError(f"hilora eval exited with {rc}")
    t1 = time.perf_counter()
    names = convert_tasks(tasks, work / "lm_tasks")
    out = work / f"lm_eval_{router}"
    lmeval.main(["run", "--model", "hilora", "--model_args",
                 f"model={model},pool={pool},router={router}", "--batch_size", str(batch_size),
                 "--tasks", ",".join(sorted(names)), "--include_path", str(work / "lm_tasks"),
                 "--output_path", str(out), "--log_samples"])
    t2 = time.perf_counter()
    ours = json.loads((work / f"hilora_eval_{router}.json").read_text())
    res = {"router": router, "items": len(examples), "seconds": {
        "hilora_eval": round(t1 - t0, 1), "lm_eval": round(t2 - t1, 1)}, "tasks": {}}
    (results_file,) = sorted(out.rglob("results_*.json"))[-1:]
    lm_results = json.loads(results_file.read_text())["results"]
    for n, task in sorted(names.items(), key=lambda kv: kv[1]):
        (samples_file,) = sorted(out.rglob(f"samples_{n}_*.jsonl"))[-1:]
        lm_items = {json.loads(line)["doc_id"]: int(json.loads(line)["acc"])
                    for line in samples_file.read_text().splitlines()}
        ours_items = {int(k.rsplit(":", 1)[1]): v for k, v in ours["correct"].items()
                      if k.rsplit(":", 1)[0] == task}
        differ = sorted(i for i in ours_items if ours_items[i] != lm_items.get(i))
        res["tasks"][task] = {
            "n": len(ours_items), "hilora_eval_acc": ours["tasks"][task]["acc"],
            "lm_eval_acc": lm_results[n]["acc,none"],
            "items_agree": not differ and set(ours_items) == set(lm_items), "differ": differ}
    res["all_agree"] = all(t["items_agree"] and t["hilora_eval_acc"] == t["lm_eval_acc"]
                           for t in res["tasks"].values())
    return res


def dg_test_items(data: Path, per_task: int | None):
    """The DG benchmark's test items of its selected tasks (see the module doc)."""
    spec = importlib.util.spec_from_file_location("bigbench_dg_run",
                                                  ROOT / "benchmarks/bigbench_dg/run.py")
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    from hilora_jax.io.loading import load_tokenizer

    p = argparse.ArgumentParser()
    run.add_split_args(p)
    args = p.parse_args([])
    selected = [s["task"] for s in json.loads(
        (ROOT / "benchmarks/bigbench_dg/results/results.json").read_text())["selected"]]
    _, _, _, test = run.prepare_splits(args, load_tokenizer("smollm2"), data)
    out = []
    for task in selected:
        exs = [ex for ex in test if ex.task == task]
        if not exs:
            raise SystemExit(f"task {task!r} of the DG benchmark has no test items in {data}")
        out += exs[:per_task] if per_task else exs
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="artifacts/bigbench_dg/run/data")
    p.add_argument("--per-task", type=int, default=None, help="first N test items per task")
    p.add_argument("--pool", default=None, help="folder of PEFT adapters (default: see doc)")
    p.add_argument("--routers", default="base,uniform")
    p.add_argument("--work", default="artifacts/lm_eval_agreement")
    p.add_argument("--out", default="benchmarks/results/lm_eval_agreement.json")
    a = p.parse_args(argv)
    command = "python benchmarks/lm_eval_agreement.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    work = Path(a.work)
    pool = a.pool or real_adapters(work / "pool")
    if pool is None:
        raise SystemExit("no pool: pass --pool DIR (a folder of PEFT adapters for SmolLM2)")
    examples = dg_test_items(Path(a.data), a.per_task)
    runs = [agreement(examples, model="smollm2", pool=str(pool), router=r, work=work)
            for r in a.routers.split(",")]
    report = {"command": command,
              "pool": sorted(q.name for q in Path(pool).iterdir()), "runs": runs,
              "all_agree": all(r["all_agree"] for r in runs)}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=2) + "\n")
    for r in runs:
        print(f"router {r['router']}: {r['items']} items, all agree: {r['all_agree']} "
              f"(hilora eval {r['seconds']['hilora_eval']}s, lm-eval {r['seconds']['lm_eval']}s)")
        for t, v in r["tasks"].items():
            print(f"  {t:45s} n={v['n']:3d} hilora eval {v['hilora_eval_acc']:.3f} "
                  f"lm-eval {v['lm_eval_acc']:.3f} differ {v['differ']}")
    return 0 if report["all_agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
