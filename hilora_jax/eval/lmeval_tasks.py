"""Our task JSONL (hilora_jax/eval/tasks.py format) -> lm-eval task YAML over local files.

`convert_tasks(paths, out_dir)` validates every line first (errors name the file and line), then
writes, for every task of the multiple-choice examples,

* ``out_dir/data/<task>.jsonl``: ``{"prompt", "choices", "answer"}`` rows in file order, with each
  choice already in the form our scorer uses (`tasks.choice_text`: a leading space);
* ``out_dir/<prefix><task>.yaml``: an lm-eval ``multiple_choice`` task over that file
  (``dataset_path: json``, ``data_files``; ``doc_to_text: prompt``, ``doc_to_choice: choices``,
  ``doc_to_target: answer``, ``target_delimiter: ""``, metrics ``acc`` and ``acc_norm``);
* ``out_dir/adapter_map.json``: lm-eval task name -> our task name (the adapter the ``oracle``
  router and the evaluation protocols use: ``model_args=...,adapter_map=<that file>``).

Run them with ``--include_path out_dir --tasks <prefix><task> ...``. lm-eval's ``acc`` is the
argmax of the summed continuation log-prob, as our ``acc``; lm-eval's ``acc_norm`` normalises by the
choice's *characters*, ours by its *tokens*, so only ``acc`` is comparable. lm-eval tokenises
prompt + choice together and splits at the prompt's length, we tokenise them separately: the two
agree whenever the tokenizer does not merge across the prompt/choice boundary (choices start
with a space). Generation examples are refused (their metrics are not mapped yet).
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import yaml

from hilora_jax._fs import atomic_file
from hilora_jax.eval.tasks import GenExample, MCExample, choice_text, load_tasks


def lmeval_task_name(task: str, prefix: str = "hilora_") -> str:
    """A name lm-eval accepts: `prefix` + the task with characters outside [A-Za-z0-9_] as `_`."""
    return prefix + re.sub(r"[^A-Za-z0-9_]", "_", task)


def convert_tasks(paths: str | os.PathLike | Iterable[str | os.PathLike],
                  out_dir: str | os.PathLike, *, prefix: str = "hilora_") -> dict[str, str]:
    """Convert task files; returns ``{lm-eval task name: our task name}`` (module doc)."""
    examples = load_tasks(paths)
    gen = [ex for ex in examples if isinstance(ex, GenExample)]
    if gen:
        raise ValueError(f"generation examples cannot be converted yet (task {gen[0].task!r}, "
                         f"{len(gen)} example(s)); pass multiple-choice task files only")
    by_task: dict[str, list[MCExample]] = defaultdict(list)
    for ex in examples:
        by_task[ex.task].append(ex)
    if not by_task:
        raise ValueError("no examples to convert")
    names: dict[str, str] = {}
    for task in by_task:
        n = lmeval_task_name(task, prefix)
        if n in names:
            raise ValueError(f"tasks {names[n]!r} and {task!r} both map to lm-eval name {n!r}")
        names[n] = task
    out = Path(out_dir).absolute()
    for n, task in names.items():
        data = out / "data" / f"{task.replace(os.sep, '_')}.jsonl"
        with atomic_file(data) as f:
            for ex in by_task[task]:
                f.write(json.dumps({"prompt": ex.prompt,
                                    "choices": [choice_text(c) for c in ex.choices],
                                    "answer": ex.answer}, ensure_ascii=False) + "\n")
        cfg = {"task": n, "dataset_path": "json",
               "dataset_kwargs": {"data_files": {"test": str(data)}},
               "test_split": "test", "output_type": "multiple_choice",
               "doc_to_text": "prompt", "doc_to_choice": "choices", "doc_to_target": "answer",
               "target_delimiter": "",
               "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                               {"metric": "acc_norm", "aggregation": "mean",
                                "higher_is_better": True}],
               "metadata": {"version": 1.0, "hilora_task": task,
                            "cluster": by_task[task][0].cluster}}
        with atomic_file(out / f"{n}.yaml") as f:
            yaml.safe_dump(cfg, f, sort_keys=False, allow_unicode=True)
    with atomic_file(out / "adapter_map.json") as f:
        json.dump(names, f, indent=2, sort_keys=True)
    return names
