"""Metrics against hand-computed values; task-file validation; MC batching; BIG-bench conversion."""

import json

import numpy as np
import pytest
from eval_utils import bb_task, write_bb

from hilora_jax.eval import bigbench as bb
from hilora_jax.eval.metrics import (
    accuracy,
    bleu,
    exact_match,
    exact_match_score,
    generation_metric,
    normalize_answer,
    rouge_l,
)
from hilora_jax.eval.tasks import (
    GenExample,
    MCExample,
    TaskFormatError,
    load_tasks,
    mc_batches,
    mc_report,
    write_jsonl,
)


class CharTok:
    """Character tokenizer (ids 3..60): prompt gets BOS=1; no merges, so token counts are exact."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __call__(self, text, add_special_tokens=True):
        ids = [3 + (ord(c) % 58) for c in text]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}


# -- metrics -----------------------------------------------------------------------------------
def test_normalize_answer_squad():
    assert normalize_answer("  The Cat, sat!  on a   MAT. ") == "cat sat on mat"
    assert normalize_answer("Theatre") == "theatre"  # articles only as whole words
    assert exact_match("An apple.", "apple") == 1.0
    assert exact_match("apples", "apple") == 0.0
    assert exact_match_score(["Paris!", "Rome", "the end"], ["paris", "Milan", "End"]) == pytest.approx(200 / 3)


def test_exact_match_loraretriever_style():
    # LoraRetriever: strip + lower + drop '.', reference cut at the first blank line.
    assert exact_match(" Paris. ", "paris\n\nexplanation", style="loraretriever") == 1.0
    assert exact_match("Paris!", "paris", style="loraretriever") == 0.0  # '!' is kept
    assert exact_match("the paris", "paris", style="loraretriever") == 0.0
    with pytest.raises(ValueError, match="style"):
        exact_match("a", "a", style="nope")


def test_rouge_l_known_value():
    # LCS("the cat on the mat", "the cat sat on the mat") = 5; P = 5/5, R = 5/6, F = 10/11.
    assert rouge_l(["the cat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100 * 10 / 11)
    assert rouge_l(["x y"], ["x y"]) == pytest.approx(100.0)
    # mean over examples: (10/11 + 0) / 2
    assert rouge_l(["the cat on the mat", "dog"], ["the cat sat on the mat", "cat"]) == pytest.approx(50 * 10 / 11)


def test_bleu_known_value():
    # n-gram precisions 4/5, 3/4, 2/3, 1/2, no brevity penalty -> (0.2)^(1/4)
    assert bleu(["a b c d e"], ["a b c d f"]) == pytest.approx(100 * 0.2 ** 0.25, abs=1e-3)
    assert bleu(["the quick brown fox"], ["the quick brown fox"]) == pytest.approx(100.0)
    # brevity penalty: hyp 4 tokens vs ref 5 -> exp(1 - 5/4); precisions 1, 1, 1, 1
    assert bleu(["a b c d"], ["a b c d e"]) == pytest.approx(100 * np.exp(1 - 5 / 4), abs=1e-3)


def test_accuracy_and_dispatch():
    assert accuracy([0, 1, 2, 2], [0, 1, 1, 2]) == 0.75
    with pytest.raises(ValueError, match="predictions"):
        accuracy([0], [0, 1])
    assert generation_metric("em", ["A cat"], ["cat"]) == 100.0
    with pytest.raises(ValueError, match="unknown metric"):
        generation_metric("f1", ["a"], ["a"])


# -- task files --------------------------------------------------------------------------------
MC = {"prompt": "Q: 1+1?\nA:", "choices": ["2", "3"], "answer": 0, "task": "add", "cluster": "math"}
GEN = {"prompt": "Translate: chat\n", "target": "cat", "task": "fr", "cluster": "mt", "metric": "bleu"}


def test_jsonl_round_trip(tmp_path):
    exs = [MCExample("p", ("a", "b"), 1, "t", "c"), GenExample("p2", "x", "t2", "c2", "rouge")]
    p = write_jsonl(exs, tmp_path / "sub" / "t.jsonl")
    assert load_tasks(p) == exs
    assert not list((tmp_path / "sub").glob(".*tmp"))  # atomic write left nothing behind


@pytest.mark.parametrize("bad,msg", [
    ({**MC, "answer": 2}, "'answer' must be an integer index"),
    ({**MC, "answer": True}, "'answer' must be an integer index"),
    ({**MC, "choices": ["2"]}, "at least two"),
    ({**MC, "choices": ["2", "2"]}, "duplicates"),
    ({**MC, "anwser": 0}, "unknown key"),
    ({k: v for k, v in MC.items() if k != "cluster"}, "missing key"),
    ({**GEN, "metric": "f1"}, "'metric' must be one of"),
    ({**GEN, "prompt": ""}, "'prompt' is empty"),
    ({"prompt": "x", "task": "t", "cluster": "c"}, "neither 'choices'"),
    ([1, 2], "expected a JSON object"),
])
def test_validation_errors_name_file_and_line(tmp_path, bad, msg):
    p = tmp_path / "tasks.jsonl"
    p.write_text(json.dumps(MC) + "\n\n" + json.dumps(GEN) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(TaskFormatError, match=msg) as e:
        load_tasks([p])
    assert f"{p}:4:" in str(e.value)  # blank line 2 is skipped but still counted


def test_invalid_json_line(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text(json.dumps(MC) + "\n{not json\n")
    with pytest.raises(TaskFormatError, match=r"t\.jsonl:2: invalid JSON"):
        load_tasks(p)


# -- MC batching -------------------------------------------------------------------------------
def test_mc_batches_target_mask_covers_exactly_the_choice():
    tok = CharTok()
    exs = [MCExample("Q: hi\nA:", ("yes", "no", "perhaps"), 0, "t", "c"),
           MCExample("Question: longer one\nAnswer:", ("a", "bb"), 1, "t", "c")]
    seen = set()
    batches = list(mc_batches(exs, tok, batch_size=4, max_len=64))
    assert len(batches) == 2 and all(b.input_ids.shape[0] == 4 for b in batches)
    for b in batches:
        t = b.input_ids.shape[1]
        for r in range(4):
            i, j = b.example_index[r], b.choice_index[r]
            if i < 0:
                continue
            seen.add((i, j))
            ex = exs[i]
            prompt = tok(ex.prompt)["input_ids"]
            choice = tok(" " + ex.choices[j], add_special_tokens=False)["input_ids"]
            n = len(prompt) + len(choice)
            # left-padded: pads, then prompt, then choice
            assert not b.attention_mask[r, : t - n].any() and b.attention_mask[r, t - n:].all()
            assert (b.input_ids[r, : t - n] == tok.pad_token_id).all()
            assert b.input_ids[r, t - n:].tolist() == prompt + choice
            assert b.target_mask[r].sum() == len(choice)
            assert b.target_mask[r, t - len(choice):].all()
            assert b.tail >= len(choice) and b.tail < t
    assert seen == {(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)}
    assert batches[1].example_index.tolist().count(-1) == 3  # filler rows marked


def test_mc_batches_too_long_names_task_and_index():
    exs = [MCExample("short", ("a", "b"), 0, "ok", "c"),
           MCExample("x" * 40, ("a", "b"), 0, "longtask", "c")]
    with pytest.raises(ValueError, match=r"task 'longtask' example 1 choice 0: .* max_len=32"):
        list(mc_batches(exs, CharTok(), max_len=32))


def test_mc_report_both_scores():
    from hilora_jax.eval.tasks import ChoiceScores

    exs = [MCExample("p", ("a", "bbbb"), 1, "t", "c")] * 2
    # choice 1: higher total (-2 > -3) but lower per-token mean (-0.5 < -3/1? no): build both cases
    s1 = ChoiceScores(np.array([-3.0, -2.0]), np.array([1.0, 4.0]))  # sum -> 1, norm -> 1 (-0.5)
    s2 = ChoiceScores(np.array([-1.0, -2.0]), np.array([1.0, 4.0]))  # sum -> 0, norm -> 1 (-0.5 > -1)
    assert (s2.pred, s2.pred_norm) == (0, 1)
    assert mc_report(exs, [s1, s2]) == {"acc": 0.5, "acc_norm": 1.0, "n": 2}


# -- BIG-bench conversion ----------------------------------------------------------------------
def test_bigbench_defaults_and_choices_listed(tmp_path):
    root = write_bb(tmp_path, "toy", bb_task())
    t = bb.read_task(bb.list_tasks(root)["toy"], "toy")
    st = bb.ConversionStats()
    exs = bb.to_mc_examples(t, bb.propose_cluster(t.keywords), stats=st)
    assert (st.total, st.ambiguous, st.not_mc, st.duplicate, len(exs)) == (103, 1, 1, 1, 100)
    e = exs[3]
    assert e.cluster == "math" and e.task == "toy" and e.choices[e.answer] == "4"
    head = "Question: what is 3 plus one?"
    assert e.prompt.startswith(head) and e.prompt.endswith("\nAnswer:")
    listed = e.prompt[len(head):-len("\nAnswer:")].split("\n  choice: ")[1:]
    assert sorted(listed) == sorted(e.choices)  # default choice_prefix, every choice listed
    # listed order is shuffled per example (seeded), so it cannot leak the answer position
    def answer_position(x):
        listed = x.prompt[: -len("\nAnswer:")].split("\n  choice: ")[1:]
        return listed.index(x.choices[x.answer])

    assert {answer_position(x) for x in exs} == {0, 1, 2}
    assert bb.to_mc_examples(t, "math") == exs  # deterministic


def test_bigbench_task_prefixes_and_no_append(tmp_path):
    root = write_bb(tmp_path, "fam/sub", bb_task(
        task_prefix="Solve the following.\n", example_input_prefix="\nProblem: ",
        example_output_prefix="\nSolution: ", append_choices_to_input="false"))
    names = bb.list_tasks(root)
    assert list(names) == ["fam/sub"]
    t = bb.read_task(names["fam/sub"], "fam/sub")
    e = bb.to_mc_examples(t, "c")[0]
    assert e.task == "fam.sub"
    assert e.prompt == "Solve the following.\nProblem: what is 0 plus one?\nSolution:"


def test_bigbench_rejects_subtask_parent(tmp_path):
    root = write_bb(tmp_path, "parent", {"name": "parent", "subtasks": ["a"]})
    with pytest.raises(ValueError, match="subtasks"):
        bb.read_task(bb.list_tasks(root)["parent"])


def test_split_is_seeded_disjoint_and_sized(tmp_path):
    root = write_bb(tmp_path, "toy", bb_task(n=120))
    exs = bb.to_mc_examples(bb.read_task(bb.list_tasks(root)["toy"], "toy"), "math")
    sp = bb.split_examples(exs, seed=3, n_samples=20, n_test=50)
    assert [len(sp[k]) for k in ("train", "samples", "test")] == [50, 20, 50]
    prompts = [{e.prompt for e in sp[k]} for k in ("train", "samples", "test")]
    assert not (prompts[0] & prompts[1] or prompts[0] & prompts[2] or prompts[1] & prompts[2])
    assert bb.split_examples(exs, seed=3) == sp
    assert bb.split_examples(exs, seed=4)["test"] != sp["test"]
    with pytest.raises(ValueError, match="need at least"):
        bb.split_examples(exs[:60], n_test=50, n_samples=20)
    # a hold-out beyond the train cap: disjoint from every split, the other splits unchanged
    ho = bb.split_examples(exs, seed=3, n_samples=20, n_test=50, max_train=30, n_holdout=15)
    assert ho["train"] == sp["train"][:30] and ho["holdout"] == sp["train"][30:45]
    assert ho["test"] == sp["test"] and ho["samples"] == sp["samples"]


def test_write_splits(tmp_path):
    root = write_bb(tmp_path, "toy", bb_task(n=90))
    man = bb.write_splits({"toy": "math"}, root, tmp_path / "out", n_test=30, n_samples=20)
    assert man["toy"]["test"] == 30 and man["toy"]["train"] == 40
    assert len(load_tasks(tmp_path / "out" / "samples.jsonl")) == 20
    man = bb.write_splits({"toy": "math"}, root, tmp_path / "ho", n_test=30, n_samples=20,
                          max_train=25, n_holdout=10)
    assert man["toy"]["train"] == 25 and man["toy"]["holdout"] == 10
    held = {e.prompt for e in load_tasks(tmp_path / "ho" / "holdout.jsonl")}
    trained = {e.prompt for e in load_tasks(tmp_path / "ho" / "train.jsonl")}
    assert len(held) == 10 and not held & trained


def test_propose_cluster():
    assert bb.propose_cluster(["common sense", "arithmetic"]) == "math"
    assert bb.propose_cluster(["social bias"]) == "bias-truth"
    assert bb.propose_cluster(["zero-shot"]) == "other"
