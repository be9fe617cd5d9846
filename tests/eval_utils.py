"""A tiny, fully deterministic evaluation setup (model dir, tokenizer, pool, examples)."""

from __future__ import annotations

import json

import numpy as np
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from hilora_jax.eval.tasks import MCExample


def word_tokenizer(vocab_size: int = 64) -> PreTrainedTokenizerFast:
    vocab = {f"w{i}": i for i in range(vocab_size)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="w3"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="w2", pad_token="w0")


def mc_examples(n_tasks: int = 5, per_task: int = 6, seed: int = 0) -> list[MCExample]:
    """Task i is named like adapter `lora{i}` of `routing_utils.random_pool`; prompts start with
    `task{i}` so the synthetic embedder places them in that adapter's cluster."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n_tasks):
        for j in range(per_task):
            words = " ".join(f"w{k}" for k in rng.integers(4, 64, size=int(rng.integers(3, 9))))
            n_choices = int(rng.integers(2, 5))
            choices = [" ".join(f"w{k}" for k in rng.integers(4, 64, size=int(rng.integers(1, 4))))
                       for _ in range(n_choices)]
            out.append(MCExample(prompt=f"task{i} q{j} {words}", choices=tuple(choices),
                                 answer=int(rng.integers(0, n_choices)), task=f"lora{i}",
                                 cluster=f"c{i % 2}"))
    return out


def write_bb(tmp_path, name, d):
    """Write BIG-bench task JSON `d` as `<tmp>/bigbench/benchmark_tasks/<name>/task.json`."""
    p = tmp_path / "bigbench" / "benchmark_tasks" / name / "task.json"
    p.parent.mkdir(parents=True)
    p.write_text(json.dumps(d))
    return tmp_path


def bb_task(n=100, **kw):
    """A toy BIG-bench MC task: n arithmetic items, one tie, one non-MC item, one duplicate."""
    exs = [{"input": f"what is {i} plus one?", "target_scores": {str(i + 1): 1, str(i + 2): 0, "x": 0}}
           for i in range(n)]
    exs.append({"input": "tie", "target_scores": {"a": 1, "b": 1}})  # ambiguous -> skipped
    exs.append({"input": "free text", "target": "y"})  # not MC -> skipped
    exs.append(dict(exs[0]))  # duplicate -> skipped
    return {"name": "toy", "description": "d", "keywords": ["arithmetic"], "examples": exs, **kw}
