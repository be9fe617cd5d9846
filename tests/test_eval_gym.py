"""reasoning-gym items -> multiple-choice examples, and their splits next to BIG-bench tasks."""

import json
import sys

import pytest
from eval_utils import bb_task, write_bb

from hilora_jax.eval import bigbench as bb
from hilora_jax.eval import gym
from hilora_jax.eval.tasks import load_tasks


def _items(n=120):
    # the reasoning-gym item layout: question, answer, metadata
    out = []
    for i in range(n):
        a, b = i % 13 + 2, i // 13 + 3
        out.append({"question": f"What is {a} + {b}?", "answer": str(a + b), "metadata": {}})
    out.append({"question": "Name the colour of the sky.", "answer": "light blue", "metadata": {}})
    out.append({"question": "Name the colour of grass.", "answer": "green", "metadata": {}})
    return out


def test_to_mc_examples_keeps_the_answer_and_draws_same_shape_distractors():
    items = _items()
    exs = gym.to_mc_examples(items, "gym.add", "gym-arithmetic", n_choices=4, seed=0)
    assert len(exs) == len(items) == len({e.prompt for e in exs})
    answers = {it["answer"] for it in items}
    for it, ex in zip(items, exs, strict=True):
        assert ex.prompt == f"Question: {it['question']}\nAnswer:"
        assert ex.target == it["answer"] and len(ex.choices) == 4
        assert len(set(ex.choices)) == 4 and set(ex.choices) <= answers
        assert all(type(c) is str for c in ex.choices)
        assert (ex.task, ex.cluster) == ("gym.add", "gym-arithmetic")
        if it["answer"].isdigit():  # plenty of numeric answers: distractors are numeric too
            assert all(c.isdigit() for c in ex.choices)
    # the gold position is shuffled, and the conversion is seeded
    assert len({e.answer for e in exs}) == 4
    assert gym.to_mc_examples(items, "gym.add", "c", seed=0)[5] == \
        gym.to_mc_examples(items, "gym.add", "c", seed=0)[5]
    again = gym.to_mc_examples(items, "gym.add", "gym-arithmetic", seed=1)
    assert [e.choices for e in again] != [e.choices for e in exs]
    # "light blue" has no two-word partner: the other non-numeric answer comes first
    sky = next(e for e in exs if "sky" in e.prompt)
    assert sky.target == "light blue" and "green" in sky.choices


def test_to_mc_examples_small_answer_sets_and_duplicates():
    items = [{"question": f"Is {i} even?", "answer": "Yes" if i % 2 == 0 else "No"}
             for i in range(10)]
    items.append(dict(items[0]))  # duplicate question: dropped
    items.append({"question": "Empty?", "answer": "  "})  # empty answer: dropped
    exs = gym.to_mc_examples(items, "gym.even", "logic", n_choices=4)
    assert len(exs) == 10
    assert all(sorted(e.choices) == ["No", "Yes"] for e in exs)


def test_to_mc_examples_errors_name_the_task_and_field():
    with pytest.raises(KeyError, match=r"gym.bad.*item 1 has no 'answer'"):
        gym.to_mc_examples([{"question": "a", "answer": "1"}, {"question": "b"}], "gym.bad", "c")
    with pytest.raises(ValueError, match=r"gym.one.*1 distinct answer"):
        gym.to_mc_examples([{"question": str(i), "answer": "7"} for i in range(5)], "gym.one", "c")
    with pytest.raises(ValueError, match="n_choices"):
        gym.to_mc_examples(_items(), "gym.add", "c", n_choices=1)


def test_generate_without_reasoning_gym_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "reasoning_gym", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"reasoning-gym is not installed.*\[bench\]"):
        gym.generate("gcd", size=10)


def test_write_splits_with_generated_tasks(tmp_path):
    root = write_bb(tmp_path, "toy", bb_task(n=90))
    extra = {"gym.add": gym.to_mc_examples(_items(), "gym.add", "gym-arithmetic")}
    man = bb.write_splits({"toy": "math"}, root, tmp_path / "out", n_test=30, n_samples=20,
                          max_train=40, n_holdout=10, extra=extra)
    assert man["gym.add"] == {"cluster": "gym-arithmetic", "train": 40, "samples": 20,
                              "test": 30, "holdout": 10}
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == man
    test = load_tasks(tmp_path / "out" / "test.jsonl")
    assert {e.task for e in test} == {"toy", "gym.add"}
    # the same split as split_examples gives for the task alone
    alone = bb.split_examples(extra["gym.add"], n_test=30, n_samples=20, max_train=40,
                              n_holdout=10)
    assert [e for e in test if e.task == "gym.add"] == alone["test"]
    with pytest.raises(ValueError, match="collides"):
        bb.write_splits({"toy": "math"}, root, tmp_path / "x", extra={"toy": extra["gym.add"]})
    with pytest.raises(ValueError, match="'gym.none' has no examples"):
        bb.write_splits({}, root, tmp_path / "z", extra={"gym.none": []})
    with pytest.raises(ValueError, match="other tasks"):
        bb.write_splits({}, root, tmp_path / "y", extra={"gym.other": extra["gym.add"]})
