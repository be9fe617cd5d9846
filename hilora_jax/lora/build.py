"""Build a real LoRA pool from task splits: train one PEFT adapter per task, then stack them.

`build_task_pool(model, tokenizer, train, samples, out_dir, ...)`:

1. for every task in `train` (JSONL examples, see `hilora_jax.eval.tasks`), train a LoRA with
   `hilora_jax.lora.train.train_lora` (optionally on the top `layers` only: the frozen prefix is then
   computed once per example) and write it as a standard PEFT adapter under
   `out_dir/adapters/<task>`; an adapter already there is reused (the pool is a cache);
2. write each task's example inputs (the `samples` split: HiLoRA fits its per-LoRA Gaussians on
   them) as `out_dir/samples/<task>.jsonl` and a pool manifest `out_dir/manifest.json` (adapter
   path, samples file, cluster);
3. convert the manifest into a stacked pool at `out_dir/pool` (orbax), atomically.

Progress is shown per task; a per-task summary (steps, seconds, first/last loss) is returned and
written to `out_dir/training.json`.
"""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from hilora_jax._fs import atomic_file
from hilora_jax.eval.tasks import Example


def fitting(examples: Sequence[Example], tokenizer, max_len: int) -> list[Example]:
    """The examples whose prompt + longest continuation fit in `max_len` tokens (a note on
    stderr says how many were dropped and from which task)."""
    from hilora_jax.eval.tasks import MCExample, choice_text, encode

    keep = []
    for ex in examples:
        conts = ex.choices if isinstance(ex, MCExample) else (ex.target,)
        n = len(encode(tokenizer, ex.prompt, special=True)) + max(
            len(encode(tokenizer, choice_text(c), special=False)) for c in conts) + 1
        if n <= max_len:
            keep.append(ex)
    if len(keep) < len(examples):
        print(f"[pool] dropped {len(examples) - len(keep)} example(s) of "
              f"{examples[0].task!r} longer than {max_len} tokens", file=sys.stderr)
    return keep


def _group(examples: Sequence[Example]) -> dict[str, list[Example]]:
    out: dict[str, list[Example]] = defaultdict(list)
    for ex in examples:
        out[ex.task].append(ex)
    return dict(out)


def _write_json(path: Path, obj) -> None:
    with atomic_file(path) as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def build_task_pool(
    model,
    tokenizer,
    train: Sequence[Example],
    samples: Sequence[Example],
    out_dir: str | os.PathLike,
    *,
    base_name: str,
    r: int = 8,
    alpha: float = 16,
    targets: Sequence[str] = ("q_proj", "v_proj"),
    layers: Sequence[int] | None = None,
    steps: int = 40,
    lr: float = 5e-3,
    batch_size: int = 8,
    max_train: int | None = 256,
    max_len: int = 256,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Train (or reuse) one adapter per task and convert them into a pool; returns the pool dir."""
    from hilora_jax.lora.io import convert_pool
    from hilora_jax.lora.train import save_peft, train_lora

    out = Path(out_dir)
    (out / "adapters").mkdir(parents=True, exist_ok=True)
    (out / "samples").mkdir(parents=True, exist_ok=True)
    by_task, samp = _group(train), _group(samples)
    missing = sorted(set(by_task) - set(samp))
    if missing:
        raise ValueError(f"tasks without example inputs (samples split): {missing}")
    summary, entries = {}, {}
    prev = {}
    if (out / "training.json").exists():
        try:
            prev = json.loads((out / "training.json").read_text())
        except json.JSONDecodeError:
            prev = {}
    for i, (task, exs) in enumerate(sorted(by_task.items())):
        adir = out / "adapters" / task
        if not (adir / "adapter_config.json").exists():
            if progress:
                print(f"[pool] {i + 1}/{len(by_task)} training LoRA for {task} "
                      f"({min(len(exs), max_train or len(exs))} examples)", file=sys.stderr)
            exs = fitting(exs, tokenizer, max_len)
            rng = np.random.default_rng(seed)
            pick = (exs if max_train is None or len(exs) <= max_train
                    else [exs[j] for j in sorted(rng.choice(len(exs), max_train, replace=False))])
            tr = train_lora(model, tokenizer, pick, r=r, alpha=alpha, targets=tuple(targets),
                            steps=steps, lr=lr, batch_size=batch_size, seed=seed,
                            max_len=max_len, layers=layers, progress=progress)
            save_peft(tr, adir, base_name)
            summary[task] = {"steps": steps, "seconds": round(tr.seconds, 1),
                             "loss_first": round(float(np.mean(tr.losses[:3])), 4),
                             "loss_last": round(float(np.mean(tr.losses[-5:])), 4)}
        else:
            old = prev.get(task, {})  # keep the training record of a reused adapter
            summary[task] = {**old, "reused": True} if "steps" in old else {"reused": True}
        sfile = out / "samples" / f"{task}.jsonl"
        with atomic_file(sfile) as f:
            for ex in samp[task]:
                f.write(json.dumps({"text": ex.prompt}) + "\n")
        entries[task] = {"path": f"adapters/{task}", "samples_file": f"samples/{task}.jsonl",
                         "cluster": exs[0].cluster}
    manifest = {"base": base_name, "adapters": entries}
    _write_json(out / "manifest.json", manifest)
    _write_json(out / "training.json", summary)
    return convert_pool(out / "manifest.json", model, out / "pool", progress=progress,
                        overwrite=True)
