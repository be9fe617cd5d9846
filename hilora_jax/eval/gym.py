"""Procedurally generated tasks (reasoning-gym) -> our JSONL multiple-choice format.

reasoning-gym (PyPI ``reasoning-gym``, the ``bench`` extra) ships seeded generators whose items
are dicts ``{"question": str, "answer": str, "metadata": dict}``. They complement BIG-bench where
its tasks run short: a generator gives as many fresh items as a split needs, and its package
(``reasoning_gym.arithmetic``, ``.algorithmic``, ``.logic``, ...) is a natural cluster of related
tasks.

Conversion (`to_mc_examples`)
-----------------------------
Every item becomes a multiple-choice example whose prompt is ``"Question: " + question +
"\\nAnswer:"`` (the layout of our BIG-bench prompts) and whose choices are the item's answer plus
``n_choices - 1`` distractors: answers of *other* items of the same generator, preferring ones of
the same shape (numeric or not, same number of words) so that the shape never gives the answer
away, then of the same kind, then any. Distractors are drawn with a per-item seeded RNG and the
choice order is shuffled the same way. Duplicate questions are dropped (first kept); so are items whose answer is empty. A generator
with fewer than two distinct answers cannot make a multiple-choice task and raises.

Generation (`generate`) imports reasoning-gym lazily; without it the error says how to install it.
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from collections.abc import Mapping, Sequence

import numpy as np

from hilora_jax.eval.tasks import MCExample

INSTALL_HINT = "pip install -e '.[bench]'  (reasoning-gym==0.1.25, see constraints.txt)"


def _shape(answer: str) -> tuple[bool, int]:
    try:
        float(answer.replace(",", ""))
        numeric = True
    except ValueError:
        numeric = False
    return numeric, len(answer.split())


def to_mc_examples(items: Sequence[Mapping], task: str, cluster: str, *, n_choices: int = 4,
                   seed: int = 0) -> list[MCExample]:
    """reasoning-gym items (``question``/``answer`` dicts) -> `MCExample`s (see module doc)."""
    if n_choices < 2:
        raise ValueError(f"task {task!r}: n_choices must be >= 2, got {n_choices}")
    seen, rows = set(), []
    for i, item in enumerate(items):
        for key in ("question", "answer"):
            if key not in item:
                raise KeyError(f"task {task!r}: item {i} has no {key!r} field "
                               f"(keys: {sorted(item)})")
        q, a = str(item["question"]).strip(), str(item["answer"]).strip()
        if not a or q in seen:
            continue
        seen.add(q)
        rows.append((q, a))
    answers = sorted({a for _, a in rows})
    if len(answers) < 2:
        raise ValueError(f"task {task!r}: {len(answers)} distinct answer(s) among {len(rows)} "
                         f"items; a multiple-choice task needs at least 2")
    shapes = {a: _shape(a) for a in answers}
    out = []
    for q, a in rows:
        rng = np.random.default_rng([seed, zlib.crc32(task.encode()), zlib.crc32(q.encode())])
        # tiers: same shape; same kind (numeric or not); the rest. Each tier is drawn at random.
        tiers = defaultdict(list)
        for d in answers:
            if d != a:
                tiers[0 if shapes[d] == shapes[a] else 1 if shapes[d][0] == shapes[a][0]
                      else 2].append(d)
        picked: list[str] = []
        for t in (0, 1, 2):
            k = min(n_choices - 1 - len(picked), len(tiers[t]))
            picked += [tiers[t][j] for j in rng.choice(len(tiers[t]), size=k, replace=False)]
        choices = [a, *picked]
        order = rng.permutation(len(choices))
        choices = [choices[j] for j in order]
        out.append(MCExample(prompt=f"Question: {q}\nAnswer:", choices=tuple(choices),
                             answer=int(np.argmin(order)), task=task, cluster=cluster))
    return out


def _import_gym():
    try:
        import reasoning_gym
        from reasoning_gym.factory import DATASETS
    except ImportError as e:
        raise ImportError(f"reasoning-gym is not installed ({e}); {INSTALL_HINT}") from e
    return reasoning_gym, DATASETS


def family(name: str) -> str:
    """The reasoning-gym package of generator `name` (``"gcd"`` -> ``"arithmetic"``)."""
    _, datasets = _import_gym()
    if name not in datasets:
        raise KeyError(f"unknown reasoning-gym generator {name!r}; known: {sorted(datasets)}")
    return datasets[name][0].__module__.split(".")[1]


def generate(name: str, *, size: int, seed: int = 0, cluster: str | None = None,
             n_choices: int = 4, **config) -> list[MCExample]:
    """`size` items of generator `name` (seeded) as MC examples of task ``gym.<name>``.

    `cluster` defaults to ``"gym-" + family(name)``. Extra keyword arguments go to the generator's
    config (e.g. ``min_value``)."""
    cluster = cluster or f"gym-{family(name)}"  # family() also rejects an unknown name
    rg, _ = _import_gym()
    items = rg.create_dataset(name, seed=seed, size=size, **config)
    return to_mc_examples(list(items), f"gym.{name}", cluster, n_choices=n_choices, seed=seed)
