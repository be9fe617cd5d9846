"""BIG-bench JSON multiple-choice tasks -> our JSONL MC format, with a seeded split.

Reading (`read_task`)
---------------------
Only JSON tasks (`task.json` with an `examples` list) are read; a parent `task.json` that only lists
`subtasks` and programmatic tasks are rejected. An example is multiple choice when it has
`target_scores` (`{choice: score}`); its answer is the choice with the highest score. Examples whose
best score is shared by several choices (ambiguous under BIG-bench's `multiple_choice_grade`, which
credits *a* highest-scoring choice) and examples with fewer than two choices are skipped and counted.

Prompt format (`format_prompt`)
-------------------------------
BIG-bench builds a zero-shot query as ``task_prefix + example_input_prefix + input
[+ choice_prefix + choice_prefix.join(choices)] + example_output_prefix`` with the defaults
``example_input_prefix="\\nQ: "``, ``example_output_prefix="\\nA: "``, ``choice_prefix="\\n  choice: "``
and ``append_choices_to_input=True`` (the choices are listed in the input, shuffled). We follow the
same structure with two simplifications for a small instruct model:

* where a task keeps the default Q:/A: prefixes we write ``"Question: "`` / ``"\\nAnswer:"``; a
  task's own prefixes are kept, with leading/trailing whitespace trimmed (so the prompt never starts
  with a newline and always ends right after the output prefix's colon);
* the task prefix, when present, is its own first paragraph (``task_prefix.strip() + "\\n"``).

Choices listed in the input (``append_choices_to_input``, which may be a JSON bool or the string
``"false"`` in the wild) use the task's ``choice_prefix`` and are shuffled with a per-example seeded
RNG, as BIG-bench shuffles them (so their order never leaks the answer). The scored continuation of
every choice is ``" " + choice`` (see `eval.tasks.choice_text`).

Split (`split_examples`)
------------------------
Per task, duplicates (same input and choice set) are dropped in conversion, then the examples are shuffled with
``numpy.random.default_rng([seed, crc32(task)])`` (stable across runs, machines and task order):
the first `n_test` go to ``test``, the next `n_samples` to ``samples`` (HiLoRA's per-LoRA example
inputs, m = 20), the rest (optionally capped) to ``train``. The three sets are disjoint by
construction.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from hilora_jax._fs import atomic_file
from hilora_jax.eval.tasks import MCExample, write_jsonl

DEFAULT_INPUT_PREFIX = "\nQ: "
DEFAULT_OUTPUT_PREFIX = "\nA: "
DEFAULT_CHOICE_PREFIX = "\n  choice: "

# Proposed clusters by BIG-bench keyword, in priority order (the first rule that matches wins).
CLUSTER_RULES: tuple[tuple[str, frozenset[str]], ...] = (
    ("math", frozenset({"mathematics", "arithmetic", "algebra", "mathematical proof",
                        "numerical response"})),
    ("multilingual", frozenset({"translation", "multilingual", "non-English",
                                "low-resource language"})),
    ("emotion-social", frozenset({"emotional understanding", "emotional intelligence",
                                  "theory of mind", "social reasoning", "humor"})),
    ("bias-truth", frozenset({"social bias", "racial bias", "gender bias", "religious bias",
                              "truthfulness", "toxicity", "misconceptions"})),
    ("logic", frozenset({"logical reasoning", "deductive reasoning", "fallacy", "algorithms",
                         "multi-step", "decomposition"})),
    ("code-symbolic", frozenset({"computer code", "non-language", "visual reasoning"})),
    ("commonsense", frozenset({"common sense", "causal reasoning", "implicit reasoning",
                               "physical reasoning"})),
    ("reading", frozenset({"reading comprehension", "contextual question-answering",
                           "paraphrase", "summarization"})),
    ("knowledge", frozenset({"context-free question answering", "memorization",
                             "domain specific", "physics", "chemistry", "biology"})),
    ("linguistics", frozenset({"linguistics", "syntax", "morphology", "word sense disambiguation",
                               "figurative language", "analogical reasoning"})),
)


@dataclasses.dataclass
class BigBenchTask:
    name: str  # e.g. "arithmetic/2_digit_addition"
    path: Path
    description: str
    keywords: tuple[str, ...]
    examples: list[dict]
    task_prefix: str
    input_prefix: str
    output_prefix: str
    choice_prefix: str
    append_choices: bool

    @property
    def slug(self) -> str:
        """Name usable as a task id / directory name: ``family.subtask``."""
        return self.name.replace("/", ".")


def _as_bool(v, where: str) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().lower() in ("true", "false"):
        return v.strip().lower() == "true"
    raise ValueError(f"{where}: append_choices_to_input must be a bool, got {v!r}")


def list_tasks(root: str | os.PathLike) -> dict[str, Path]:
    """All JSON tasks with examples under a BIG-bench checkout: `{name: task.json path}`.

    Names are paths relative to `benchmark_tasks/` (``family`` or ``family/subtask``).
    """
    root = Path(root)
    out = {}
    for p in sorted(root.rglob("task.json")):
        parts = p.parent.parts
        if "benchmark_tasks" in parts:
            rel = parts[parts.index("benchmark_tasks") + 1:]
        else:
            rel = p.parent.relative_to(root).parts
        if not rel:
            continue
        out["/".join(rel)] = p
    return out


def read_task(path: str | os.PathLike, name: str | None = None) -> BigBenchTask:
    """Parse one BIG-bench `task.json` (see the module docstring)."""
    path = Path(path)
    name = name or path.parent.name
    with open(path, encoding="utf-8") as f:
        d = json.load(f)
    if not isinstance(d.get("examples"), list):
        what = "lists subtasks only" if "subtasks" in d else "has no 'examples' list"
        raise ValueError(f"{path}: not a JSON task with examples ({what})")
    return BigBenchTask(
        name=name, path=path, description=str(d.get("description", "")),
        keywords=tuple(d.get("keywords", ())), examples=d["examples"],
        task_prefix=str(d.get("task_prefix", "") or ""),
        input_prefix=str(d.get("example_input_prefix", DEFAULT_INPUT_PREFIX)),
        output_prefix=str(d.get("example_output_prefix", DEFAULT_OUTPUT_PREFIX)),
        choice_prefix=str(d.get("choice_prefix", DEFAULT_CHOICE_PREFIX)),
        append_choices=_as_bool(d.get("append_choices_to_input", True), str(path)),
    )


def format_prompt(task: BigBenchTask, text: str, listed_choices: Sequence[str] | None) -> str:
    """The zero-shot prompt for one input (choices listed when the task appends them)."""
    inp = "Question: " if task.input_prefix == DEFAULT_INPUT_PREFIX else task.input_prefix.strip()
    if inp and not inp.endswith((" ", "\n")):
        inp += " "
    out = "Answer:" if task.output_prefix == DEFAULT_OUTPUT_PREFIX else task.output_prefix.strip()
    s = (task.task_prefix.strip() + "\n") if task.task_prefix.strip() else ""
    s += inp + text.strip()
    if listed_choices:
        s += task.choice_prefix + task.choice_prefix.join(listed_choices)
    return s + "\n" + out


@dataclasses.dataclass
class ConversionStats:
    total: int = 0
    not_mc: int = 0
    ambiguous: int = 0
    duplicate: int = 0


def to_mc_examples(task: BigBenchTask, cluster: str, *, seed: int = 0,
                   stats: ConversionStats | None = None) -> list[MCExample]:
    """Convert every usable multiple-choice example of `task`, deduplicated by (input, choice set)."""
    st = stats if stats is not None else ConversionStats()
    out, seen = [], set()
    rng = np.random.default_rng([seed, zlib.crc32(task.name.encode())])
    for ex in task.examples:
        st.total += 1
        ts = ex.get("target_scores")
        if not isinstance(ts, Mapping) or len(ts) < 2 or "input" not in ex:
            st.not_mc += 1
            continue
        choices = [str(c).strip() for c in ts]
        scores = np.asarray([float(v) for v in ts.values()])
        if len(set(choices)) != len(choices) or not all(choices):
            st.not_mc += 1
            continue
        best = np.flatnonzero(scores == scores.max())
        if len(best) != 1:
            st.ambiguous += 1
            continue
        key = (str(ex["input"]).strip(), tuple(sorted(choices)))
        if key in seen:
            st.duplicate += 1
            continue
        seen.add(key)
        listed = [choices[i] for i in rng.permutation(len(choices))] if task.append_choices else None
        prompt = format_prompt(task, str(ex["input"]), listed)
        out.append(MCExample(prompt, tuple(choices), int(best[0]), task.slug, cluster))
    return out


def propose_cluster(keywords: Iterable[str]) -> str:
    """First `CLUSTER_RULES` cluster sharing a keyword with the task, else ``"other"``."""
    kw = {k.strip() for k in keywords}
    for cluster, words in CLUSTER_RULES:
        if kw & words:
            return cluster
    return "other"


def split_examples(examples: Sequence[MCExample], *, seed: int = 0, n_samples: int = 20,
                   n_test: int = 50, max_train: int | None = None, min_train: int = 1,
                   n_holdout: int = 0) -> dict[str, list[MCExample]]:
    """Seeded, disjoint `{"train", "samples", "test"}` split of one task's examples.

    With `max_train` and `n_holdout > 0` a `"holdout"` split holds up to `n_holdout` of the
    examples beyond the train cap (never trained on). A task's split depends only on its own
    examples and `seed`, not on the other tasks."""
    tasks = {e.task for e in examples}
    if len(tasks) != 1:
        raise ValueError(f"split_examples expects one task, got {sorted(tasks)}")
    task = tasks.pop()
    need = n_test + n_samples + min_train
    if len(examples) < need:
        raise ValueError(f"task {task!r}: {len(examples)} examples, need at least {need} "
                         f"(test {n_test} + samples {n_samples} + train {min_train})")
    rng = np.random.default_rng([seed, zlib.crc32(task.encode())])
    perm = rng.permutation(len(examples))
    test = [examples[i] for i in perm[:n_test]]
    samples = [examples[i] for i in perm[n_test:n_test + n_samples]]
    train = [examples[i] for i in perm[n_test + n_samples:]]
    out = {"train": train, "samples": samples, "test": test}
    if max_train is not None:
        out["train"] = train[:max_train]
        if n_holdout:
            out["holdout"] = train[max_train:max_train + n_holdout]
    return out


def write_splits(tasks: Mapping[str, str], root: str | os.PathLike, out_dir: str | os.PathLike, *,
                 seed: int = 0, n_samples: int = 20, n_test: int = 50,
                 max_train: int | None = 1000, n_holdout: int = 0,
                 extra: Mapping[str, Sequence[MCExample]] | None = None) -> dict[str, dict]:
    """Convert `{bigbench name: cluster}` and write `train/samples/test.jsonl` under `out_dir`
    (and `holdout.jsonl` with `n_holdout`, see `split_examples`).

    `extra` adds already converted tasks (`{task: examples}`, e.g. from `eval.gym.generate`),
    split the same way. Each file holds all tasks (each line carries its `task` and `cluster`).
    Writes a `manifest.json` with per-task counts. Returns the manifest.
    """
    paths = list_tasks(root)
    out_dir = Path(out_dir)
    splits: dict[str, list[MCExample]] = {"train": [], "samples": [], "test": []}
    if n_holdout:
        splits["holdout"] = []
    manifest = {}
    for name, cluster in tasks.items():
        if name not in paths:
            raise KeyError(f"BIG-bench task {name!r} not found under {root}")
        t = read_task(paths[name], name)
        st = ConversionStats()
        exs = to_mc_examples(t, cluster, seed=seed, stats=st)
        sp = split_examples(exs, seed=seed, n_samples=n_samples, n_test=n_test,
                            max_train=max_train, n_holdout=n_holdout)
        for k, v in sp.items():
            splits[k].extend(v)
        manifest[t.slug] = {"bigbench": name, "cluster": cluster, "keywords": list(t.keywords),
                            **{k: len(v) for k, v in sp.items()}, **dataclasses.asdict(st)}
    for task, exs in (extra or {}).items():
        if not exs:
            raise ValueError(f"extra task {task!r} has no examples")
        if task in manifest:
            raise ValueError(f"extra task {task!r} collides with a BIG-bench task")
        bad = {e.task for e in exs} - {task}
        if bad:
            raise ValueError(f"extra task {task!r} holds examples of other tasks: {sorted(bad)}")
        sp = split_examples(list(exs), seed=seed, n_samples=n_samples, n_test=n_test,
                            max_train=max_train, n_holdout=n_holdout)
        for k, v in sp.items():
            splits[k].extend(v)
        manifest[task] = {"cluster": exs[0].cluster,
                          **{k: len(v) for k, v in sp.items()}}
    for k, v in splits.items():
        write_jsonl(v, out_dir / f"{k}.jsonl")
    with atomic_file(out_dir / "manifest.json") as f:
        f.write(json.dumps(manifest, indent=2) + "\n")
    return manifest
