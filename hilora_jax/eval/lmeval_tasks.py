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

Generation examples (``target`` + ``metric``) become ``generate_until`` tasks over
``{"prompt", "target"}`` rows: greedy, ``until`` (default ``["\\n"]``) and ``max_gen_toks``
(default 32) as given to `convert_tasks`, scored by *our* metric (``em`` | ``rouge`` | ``bleu``,
`hilora_jax.eval.metrics.generation_metric`, 0-100) through ``out_dir/hilora_metrics.py``
(``process_results`` keeps ``(prediction, target)`` pairs, the aggregation applies our metric to
the whole task: corpus BLEU stays corpus BLEU). A task must use one metric throughout.

Run them with ``--include_path out_dir --tasks <prefix><task> ...``. lm-eval's ``acc`` is the
argmax of the summed continuation log-prob, as our ``acc``; lm-eval's ``acc_norm`` normalises by the
choice's *characters*, ours by its *tokens*, so only ``acc`` is comparable. lm-eval tokenises
prompt + choice together and splits at the prompt's length, we tokenise them separately: the two
agree whenever the tokenizer does not merge across the prompt/choice boundary (choices start
with a space).
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


_METRICS_PY = '''"""Written by hilora_jax.eval.lmeval_tasks: our generation metrics for lm-eval tasks."""

from hilora_jax.eval.metrics import generation_metric


def _pair(doc, results):
    return (results[0], doc["target"])


def _agg(name):
    def agg(items):
        preds, refs = zip(*items, strict=True) if items else ((), ())
        return generation_metric(name, list(preds), list(refs))

    return agg


def process_em(doc, results):
    return {"em": _pair(doc, results)}


def process_rouge(doc, results):
    return {"rouge": _pair(doc, results)}


def process_bleu(doc, results):
    return {"bleu": _pair(doc, results)}


agg_em, agg_rouge, agg_bleu = _agg("em"), _agg("rouge"), _agg("bleu")
'''


def convert_tasks(paths: str | os.PathLike | Iterable[str | os.PathLike],
                  out_dir: str | os.PathLike, *, prefix: str = "hilora_",
                  max_gen_toks: int = 32, until: Iterable[str] = ("\n",)) -> dict[str, str]:
    """Convert task files; returns ``{lm-eval task name: our task name}`` (module doc)."""
    if int(max_gen_toks) < 1:
        raise ValueError(f"max_gen_toks must be >= 1, got {max_gen_toks}")
    until = [str(u) for u in until]
    examples = load_tasks(paths)
    by_task: dict[str, list[MCExample | GenExample]] = defaultdict(list)
    for ex in examples:
        by_task[ex.task].append(ex)
    if not by_task:
        raise ValueError("no examples to convert")
    for task, exs in by_task.items():
        kinds = {type(ex).__name__ for ex in exs}
        if len(kinds) > 1:
            raise ValueError(f"task {task!r} mixes multiple-choice and generation examples")
        metrics = sorted({ex.metric for ex in exs if isinstance(ex, GenExample)})
        if len(metrics) > 1:
            raise ValueError(f"task {task!r} uses several metrics {metrics}; one per task")
    names: dict[str, str] = {}
    for task in by_task:
        n = lmeval_task_name(task, prefix)
        if n in names:
            raise ValueError(f"tasks {names[n]!r} and {task!r} both map to lm-eval name {n!r}")
        names[n] = task
    out = Path(out_dir).absolute()
    if any(isinstance(exs[0], GenExample) for exs in by_task.values()):
        with atomic_file(out / "hilora_metrics.py") as f:
            f.write(_METRICS_PY)
    for n, task in names.items():
        data = out / "data" / f"{task.replace(os.sep, '_')}.jsonl"
        exs = by_task[task]
        if isinstance(exs[0], GenExample):
            with atomic_file(data) as f:
                for ex in exs:
                    f.write(json.dumps({"prompt": ex.prompt, "target": ex.target},
                                       ensure_ascii=False) + "\n")
            metric = exs[0].metric
            cfg = {"task": n, "dataset_path": "json",
                   "dataset_kwargs": {"data_files": {"test": str(data)}},
                   "test_split": "test", "output_type": "generate_until",
                   "doc_to_text": "prompt", "doc_to_target": "target",
                   "generation_kwargs": {"until": until, "max_gen_toks": int(max_gen_toks),
                                         "do_sample": False},
                   "metadata": {"version": 1.0, "hilora_task": task, "cluster": exs[0].cluster,
                                "hilora_metric": metric}}
            text = yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True)
            # lm-eval's `!function` tag: our metric, from hilora_metrics.py beside this file
            text += (f"process_results: !function hilora_metrics.process_{metric}\n"
                     f"metric_list:\n- metric: {metric}\n"
                     f"  aggregation: !function hilora_metrics.agg_{metric}\n"
                     f"  higher_is_better: true\n")
            with atomic_file(out / f"{n}.yaml") as f:
                f.write(text)
            continue
        with atomic_file(data) as f:
            for ex in exs:
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
