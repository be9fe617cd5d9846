"""The `hilora` lm-eval backend against lm-eval's own `hf` backend on the same saved tiny llama.

Offline: the model and tokenizer are written to a temp dir, tasks read local JSONL files
(`dataset_path: json`). fp32 log-likelihoods agree to 1e-4, greedy generations are identical, and
with a LoRA pool + the oracle router each request equals `hf` with that PEFT adapter loaded.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("lm_eval", reason="needs the `lmeval` extra (lm-eval>=0.4.13)")

from lm_eval.api.instance import Instance  # noqa: E402

from tests.eval_utils import word_tokenizer  # noqa: E402
from tests.hf_utils import VOCAB, make_hf_model  # noqa: E402
from tests.lmeval_utils import assert_ll_equal, hf_lm, words  # noqa: E402
from tests.lmeval_utils import hilora_lm as make_hilora_lm  # noqa: E402
from tests.peft_utils import POOL_SPECS, make_pool_dirs  # noqa: E402

MAX_LEN = 48
SPECS = {"qv_r4": POOL_SPECS["qv_r4"], "all_r8_rslora": POOL_SPECS["all_r8_rslora"]}
ADAPTER_MAP = {"task_a": "qv_r4", "task_b": "all_r8_rslora"}


def _words(rng, lo, hi):
    return words(rng, lo, hi, VOCAB)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmeval")
    model_dir = root / "model"
    make_hf_model(model_dir, seed=3)
    word_tokenizer(VOCAB).save_pretrained(str(model_dir))
    pool = make_pool_dirs(model_dir, root / "pool", SPECS, seed=5)
    return root, model_dir, pool


@pytest.fixture(scope="module")
def hilora_lm(assets):
    return make_hilora_lm(assets[1], MAX_LEN)


def _hf(model_dir, **kw):
    return hf_lm(model_dir, MAX_LEN, **kw)


def _ll_requests(seed=0, task="task_a", n=10):
    rng = np.random.default_rng(seed)
    reqs = [(_words(rng, 2, 12), " " + _words(rng, 1, 5)) for _ in range(n)]
    reqs.append(("", "w7 w8 w9"))  # empty context: prefix token
    reqs.append((_words(rng, 70, 71), " w5 w6"))  # longer than max_length: left-truncated
    reqs.append((reqs[0][0] + " ", "w11"))  # trailing context space moves to the continuation
    return [Instance("loglikelihood", {}, r, i, metadata=(task, i, 1)) for i, r in enumerate(reqs)]


def test_loglikelihood_and_rolling_equal_hf(assets, hilora_lm):
    _, model_dir, _ = assets
    hf = _hf(model_dir)
    reqs = _ll_requests()
    ours, ref = hilora_lm.loglikelihood(reqs), hf.loglikelihood(reqs)
    assert_ll_equal(ours, ref)
    rng = np.random.default_rng(1)
    docs = [_words(rng, 3, 10), _words(rng, 60, 61), _words(rng, 130, 131)]  # 1, 2 and 3 windows
    rr = [Instance("loglikelihood_rolling", {}, (d,), i) for i, d in enumerate(docs)]
    np.testing.assert_allclose(hilora_lm.loglikelihood_rolling(rr), hf.loglikelihood_rolling(rr),
                               atol=1e-4, rtol=0)
    # sharded over a 4x2 (data x model) mesh of the 8 fake CPU devices: same numbers
    from hilora_jax.lmeval import HiLoRALM

    sharded = HiLoRALM(model=str(model_dir), mesh="4x2", max_length=MAX_LEN, batch_size=4)
    assert_ll_equal(sharded.loglikelihood(reqs), ours)


def _gen_requests(seed=2, n=7):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        kw = {"until": ["w9"] if i % 2 else ["w13", "w21"], "max_gen_toks": 6 + (i % 3) * 5,
              "do_sample": False}
        out.append(Instance("generate_until", {}, (_words(rng, 2, 14), kw), i,
                            metadata=("task_a" if i % 2 else "task_b", i, 1)))
    # context longer than max_length - max_gen_toks: left-truncated as the hf backend does
    out.append(Instance("generate_until", {}, (_words(rng, 45, 46), {"until": ["w9"],
                                                                     "max_gen_toks": 8}), n,
                        metadata=("task_a", n, 1)))
    return out


def test_generate_until_greedy_identical_to_hf(assets, hilora_lm):
    _, model_dir, _ = assets
    reqs = _gen_requests()
    # single-token stop strings stop decoding early (here every `until` is one token); the
    # multi-token one is only cut from the text
    tok = hilora_lm.tokenizer
    assert hilora_lm._stop_tokens(["w9", "w13 w14"]) == sorted({tok.eos_token_id, 9})
    ours, ref = hilora_lm.generate_until(reqs), _hf(model_dir).generate_until(reqs)
    assert ours == ref
    multi = [Instance("generate_until", {}, (r.args[0], {**r.args[1], "until": ["w9 w9", "w13"]}),
                      i) for i, r in enumerate(reqs)]
    assert hilora_lm.generate_until(multi) == _hf(model_dir).generate_until(multi)
    assert any(len(s.split()) >= 3 for s in ours)  # not all empty / cut at once
    # sampled: reproducible for a seed, different for another seed
    sreqs = [Instance("generate_until", {}, (r.args[0], {"until": ["w9"], "max_gen_toks": 12,
                                                         "do_sample": True, "temperature": 1.0}),
                      i) for i, r in enumerate(reqs)]
    s0 = hilora_lm.generate_until(sreqs)
    assert hilora_lm.generate_until(sreqs) == s0
    hilora_lm.seed = 1
    try:
        assert hilora_lm.generate_until(sreqs) != s0
    finally:
        hilora_lm.seed = 0


def test_oracle_pool_equals_hf_with_peft(assets, hilora_lm):
    from hilora_jax.lmeval import HiLoRALM

    _, model_dir, pool = assets
    amap = ";".join(f"{t}:{a}" for t, a in ADAPTER_MAP.items())
    lm = HiLoRALM(model=str(model_dir), pool=str(assets[0] / "pool"), router="oracle",
                  adapter_map=amap, max_length=MAX_LEN, batch_size=4)
    # the two tasks' requests interleaved: one batch routes each row to its own adapter
    ra, rb = _ll_requests(seed=4, task="task_a", n=6), _ll_requests(seed=5, task="task_b", n=6)
    mixed = [r for pair in zip(ra, rb, strict=True) for r in pair]
    ours = lm.loglikelihood(mixed)
    base = hilora_lm.loglikelihood(mixed)
    ga = [g for g in _gen_requests(seed=6) if g.task_name == "task_a"]
    ours_gen = lm.generate_until(ga)
    for task, reqs in (("task_a", ra), ("task_b", rb)):
        hf = _hf(model_dir, peft=pool[ADAPTER_MAP[task]])
        assert_ll_equal([ours[mixed.index(r)] for r in reqs], hf.loglikelihood(reqs))
        if task == "task_a":
            assert ours_gen == hf.generate_until(ga)
    # the adapters change the numbers (a pass is not the base model passing twice)
    assert np.max(np.abs(np.array([x[0] for x in ours]) - np.array([x[0] for x in base]))) > 1e-2
    # unseen-within: each task's own adapter is deactivated, so the oracle falls back to the base
    lm.protocol = "unseen-within"
    assert_ll_equal(lm.loglikelihood(mixed), base)


def test_bad_model_args(assets):
    from hilora_jax.lmeval import HiLoRALM
    from hilora_jax.lora.io import AdapterError

    _, model_dir, _ = assets
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['colour', 'temprature'\]"):
        HiLoRALM(model=str(model_dir), temprature=1, colour="red")
    with pytest.raises(ValueError, match="router='oracle' needs a `pool`"):
        HiLoRALM(model=str(model_dir), router="oracle")
    with pytest.raises(ValueError, match="max_length=999 exceeds"):
        HiLoRALM(model=str(model_dir), max_length=999)
    with pytest.raises(ValueError, match="adapter_map: 'nocolon' is not of the form"):
        HiLoRALM(model=str(model_dir), adapter_map="nocolon")
    with pytest.raises(ValueError, match=r"adapter_map: adapter\(s\) not in the pool"):
        HiLoRALM(model=str(model_dir), pool=str(assets[0] / "pool"), router="oracle",
                 adapter_map="task_a:nope")
    # a pool made for another model (wider MLP) is refused when loaded, naming the adapter
    other = assets[0] / "other_model"
    if not other.exists():
        make_hf_model(other, seed=1, intermediate_size=24)
        word_tokenizer(VOCAB).save_pretrained(str(other))
    with pytest.raises(AdapterError, match=r"adapter 'all_r8_rslora': .*has shape \(8, 40\), "
                       r"expected \(8, 24\)"):
        HiLoRALM(model=str(other), pool=str(assets[0] / "pool"), router="oracle")
    # malformed values are refused in one line before anything is loaded (no such model needed)
    for kw, msg in ((dict(batch_size="big"), "batch_size: 'big' is not an integer or 'auto'"),
                    (dict(dtype="fp8"), "dtype: 'fp8' is not one of"),
                    (dict(mesh="4"), "mesh: '4' is not DATAxMODEL"),
                    (dict(protocol="unseen"), "protocol: 'unseen' is not one of"),
                    (dict(multihost="maybe"), "multihost: 'maybe' is not a boolean")):
        with pytest.raises(ValueError, match=msg):
            HiLoRALM(model="/nonexistent/model", **kw)


def test_requests_longer_than_max_length(hilora_lm):
    """lm-eval's truncation convention (as its `hf` backend): a log-likelihood request longer
    than max_length + 1 tokens is left-truncated (tested against hf in the parity test above); a
    continuation alone longer than max_length cannot be scored and is refused, naming the
    request; generation keeps the last max_length - max_gen_toks context tokens, and
    max_gen_toks >= max_length is refused."""
    long_cont = " " + " ".join(["w5"] * (MAX_LEN + 1))
    reqs = [Instance("loglikelihood", {}, ("w4 w6", " w7"), 0),
            Instance("loglikelihood", {}, ("w4", long_cont), 1)]
    with pytest.raises(ValueError, match=rf"request 1: continuation of {MAX_LEN + 1} tokens is "
                       rf"longer than max_length={MAX_LEN}"):
        hilora_lm.loglikelihood(reqs)
    g = [Instance("generate_until", {}, ("w4 w5", {"until": ["w9"], "max_gen_toks": MAX_LEN}), 0)]
    with pytest.raises(ValueError, match=rf"max_gen_toks={MAX_LEN} must be less than "
                       rf"max_length={MAX_LEN}"):
        hilora_lm.generate_until(g)
    g = [Instance("generate_until", {}, ("w4 w5", {"until": ["w9"], "num_beams": 4}), 0)]
    with pytest.raises(ValueError, match=r"unsupported generation kwargs \['num_beams'\]"):
        hilora_lm.generate_until(g)


def _write_tasks(root, n=6, routed=False, name="tasks"):
    """Tiny local lm-eval tasks (`tiny_mc`, `tiny_gen`); `routed`: questions start with
    `task{i}`, which `routing_utils.random_pool`'s embedder places in adapter i's cluster."""
    rng = np.random.default_rng(7)
    mc, gen = [], []
    for k in range(n):
        pre = f"task{k % 5} " if routed else ""
        choices = [_words(rng, 1, 4) for _ in range(3)]
        mc.append({"question": pre + _words(rng, 3, 9), "choices": choices,
                   "answer": int(rng.integers(0, 3))})
        gen.append({"question": pre + _words(rng, 3, 9), "answer": _words(rng, 1, 3)})
    d = root / name
    d.mkdir(exist_ok=True)
    for name, rows in (("mc", mc), ("gen", gen)):
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "tiny_mc.yaml").write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {d / 'mc.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    (d / "tiny_gen.yaml").write_text(f"""task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {d / 'gen.jsonl'}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: answer
generation_kwargs:
  until: ["w9"]
  max_gen_toks: 5
  do_sample: false
metric_list:
  - metric: exact_match
""")
    return d


def test_simple_evaluate_through_registry_matches_hf(assets):
    import lm_eval
    from lm_eval.tasks import TaskManager

    import hilora_jax.lmeval  # noqa: F401

    root, model_dir, _ = assets
    tm = TaskManager(include_path=str(_write_tasks(root)))
    kw = dict(tasks=["tiny_mc", "tiny_gen"], task_manager=tm, log_samples=True, batch_size=4)
    ours = lm_eval.simple_evaluate(model="hilora", model_args=f"model={model_dir},"
                                   f"max_length={MAX_LEN}", **kw)
    ref = lm_eval.simple_evaluate(model=_hf(model_dir), **kw)
    for task, metrics in (("tiny_mc", ("acc,none", "acc_norm,none")),
                          ("tiny_gen", ("exact_match,none",))):
        for m in metrics:
            assert ours["results"][task][m] == ref["results"][task][m], (task, m)
        a, b = ours["samples"][task], ref["samples"][task]
        assert len(a) == len(b) == 6
        for sa, sb in zip(a, b, strict=True):
            if task == "tiny_mc":
                np.testing.assert_allclose([float(r[0][0]) for r in sa["resps"]],
                                           [float(r[0][0]) for r in sb["resps"]], atol=1e-4)
            else:
                assert sa["resps"] == sb["resps"]


def test_converted_tasks_acc_equals_hilora_scoring(assets, hilora_lm, tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from hilora_jax.eval.lmeval_tasks import convert_tasks
    from hilora_jax.eval.tasks import mc_report, score_choices, write_jsonl
    from tests.eval_utils import mc_examples

    examples = mc_examples(n_tasks=2, per_task=5, seed=3)
    src = write_jsonl(examples, tmp_path / "ours.jsonl")
    names = convert_tasks(src, tmp_path / "lm")
    assert names == {"hilora_lora0": "lora0", "hilora_lora1": "lora1"}
    assert json.loads((tmp_path / "lm" / "adapter_map.json").read_text()) == names
    res = lm_eval.simple_evaluate(model=hilora_lm, tasks=sorted(names), log_samples=True,
                                  task_manager=TaskManager(include_path=str(tmp_path / "lm")))
    for n, task in names.items():
        exs = [ex for ex in examples if ex.task == task]
        scores = score_choices(hilora_lm.engine, exs, hilora_lm.tokenizer, batch_size=4)
        assert res["results"][n]["acc,none"] == mc_report(exs, scores)["acc"]
        samples = sorted(res["samples"][n], key=lambda s: s["doc_id"])
        assert len(samples) == len(exs)
        for s, sc in zip(samples, scores, strict=True):
            np.testing.assert_allclose([float(r[0][0]) for r in s["resps"]], sc.logprob,
                                       atol=1e-4)


def test_converted_generation_tasks_use_our_metrics(assets, hilora_lm, tmp_path):
    """Generation examples -> lm-eval `generate_until` tasks scored by our em / rouge / bleu: the
    lm-eval number equals our metric over the backend's own generations, and `hf` agrees."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from hilora_jax.eval.lmeval_tasks import convert_tasks
    from hilora_jax.eval.metrics import generation_metric
    from hilora_jax.eval.tasks import GenExample, write_jsonl

    rng = np.random.default_rng(11)
    exs = []
    for task, metric in (("g_em", "em"), ("g_rouge", "rouge"), ("g_bleu", "bleu")):
        for _ in range(5):
            exs.append(GenExample(_words(rng, 3, 9), _words(rng, 1, 4), task, "c0", metric))
    # one target is the model's own greedy continuation: em is not trivially 0
    first = exs[0]
    own = hilora_lm.generate_until([Instance("generate_until", {}, (first.prompt, {
        "until": ["\n"], "max_gen_toks": 4, "do_sample": False}), 0)])[0]
    exs[0] = GenExample(first.prompt, own.strip(), first.task, first.cluster, first.metric)
    names = convert_tasks(write_jsonl(exs, tmp_path / "gen.jsonl"), tmp_path / "lm",
                          max_gen_toks=4)
    assert (tmp_path / "lm" / "hilora_metrics.py").exists()
    tm = TaskManager(include_path=str(tmp_path / "lm"))
    ours = lm_eval.simple_evaluate(model=hilora_lm, tasks=sorted(names), log_samples=True,
                                   task_manager=tm)
    ref = lm_eval.simple_evaluate(model=_hf(assets[1]), tasks=sorted(names), log_samples=True,
                                  task_manager=tm)
    for n, task in names.items():
        mine = [ex for ex in exs if ex.task == task]
        m = mine[0].metric
        samples = sorted(ours["samples"][n], key=lambda x: x["doc_id"])
        preds = [x["filtered_resps"][0] for x in samples]
        direct = hilora_lm.generate_until([Instance("generate_until", {}, (ex.prompt, {
            "until": ["\n"], "max_gen_toks": 4, "do_sample": False}), i)
            for i, ex in enumerate(mine)])
        assert preds == direct
        want = generation_metric(m, preds, [ex.target for ex in mine])
        assert ours["results"][n][f"{m},none"] == pytest.approx(want, abs=1e-9)
        assert ref["results"][n][f"{m},none"] == pytest.approx(want, abs=1e-9)
    assert ours["results"]["hilora_g_em"]["em,none"] > 0


def test_convert_refuses_mixed_tasks_and_bad_lines(tmp_path):
    from hilora_jax.eval.lmeval_tasks import convert_tasks
    from hilora_jax.eval.tasks import TaskFormatError

    g = tmp_path / "gen.jsonl"
    rows = [{"prompt": "p", "target": "t", "task": "x", "cluster": "c", "metric": "em"},
            {"prompt": "q", "target": "t", "task": "x", "cluster": "c", "metric": "bleu"}]
    g.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"task 'x' uses several metrics \['bleu', 'em'\]"):
        convert_tasks(g, tmp_path / "out")
    rows[1] = {"prompt": "q", "choices": ["a", "b"], "answer": 0, "task": "x", "cluster": "c"}
    g.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match="task 'x' mixes multiple-choice and generation"):
        convert_tasks(g, tmp_path / "out")
    b = tmp_path / "bad.jsonl"
    b.write_text(json.dumps({"prompt": "p", "choices": ["a", "b"], "anwser": 0, "task": "x",
                             "cluster": "c"}) + "\n")
    with pytest.raises(TaskFormatError, match=r"bad.jsonl:1: unknown key"):
        convert_tasks(b, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written on failure


def test_hilora_router_routes_each_request_from_its_context(assets, hilora_lm, tmp_path):
    """Batched, routed requests equal each request routed alone and scored by `Engine.score`."""
    from hilora_jax.lmeval import HiLoRALM
    from hilora_jax.lora.io import save_pool
    from tests.routing_utils import random_pool

    _, model_dir, _ = assets
    pool, embedder, _ = random_pool(hilora_lm.config)
    save_pool(pool, tmp_path / "pool")
    lm = HiLoRALM.create_from_arg_obj(
        {"model": str(model_dir), "pool": str(tmp_path / "pool"), "router": "hilora",
         "router_options": {"embedder": embedder}, "router.k": 2, "max_length": MAX_LEN,
         "trace_path": str(tmp_path / "trace.jsonl")},
        {"batch_size": 4})
    assert lm.router.params["k"] == 2
    rng = np.random.default_rng(9)
    reqs = [Instance("loglikelihood", {}, (f"task{i % 5} q{i} " + _words(rng, 2, 8),
                                           " " + _words(rng, 1, 4)), i) for i in range(5)]
    ours = lm.loglikelihood(reqs)
    alone, budgets = [], set()
    for r in reqs:
        ctx, cont = lm._encode_pair(*r.args)
        routing = lm.router.route([r.args[0]])
        budgets.add(tuple(routing.info["cand_idx"][0][routing.info["cand_valid"][0]].tolist()))
        ids = np.asarray([ctx + cont], np.int32)
        tm = np.zeros_like(ids, bool)
        tm[0, len(ctx):] = True
        total, _ = lm.engine.score(ids, np.ones_like(tm), tm, lora=routing.hook)
        alone.append(float(np.asarray(total)[0]))
    np.testing.assert_allclose([x[0] for x in ours], alone, atol=1e-4, rtol=0)
    assert len(budgets) > 1  # requests really were routed differently
    # the routing trace holds each request's own decision: candidates, ROC counts, weights
    trace = [json.loads(line) for line in (tmp_path / "trace.jsonl").read_text().splitlines()]
    assert [(t["doc_id"], t["idx"], t["request_type"]) for t in trace] == \
        [(-1, i, "loglikelihood") for i in range(5)]  # no doc_id outside lm-eval's evaluator
    for t, r in zip(trace, reqs, strict=True):
        info = lm.router.route([r.args[0]]).info
        used = info["cand_valid"][0] & (info["n_rocs"][0] > 0)
        assert t["candidates"] == [lm.pool.names[a] for a in info["cand_idx"][0][used]]
        assert t["rocs"] == info["n_rocs"][0][used].tolist()
        assert sum(t["rocs"]) == t["total_rocs"] == t["budget"] == int(info["budget"][0])
        np.testing.assert_allclose(t["weights"], info["probs"][0][used], atol=1e-5)
        assert t["router"] == "hilora" and t["n_candidates"] == len(t["candidates"])
    base = [x[0] for x in hilora_lm.loglikelihood(reqs)]
    assert np.max(np.abs(np.array(alone) - base)) > 1e-2


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(assets, hilora_lm, tmp_path):
    """lm-eval's rank / world_size contract over `jax.distributed` (gloo on CPU): two processes
    (HILORA_* variables; each takes its documents and builds the model on its 2 local devices)
    give the same metrics, per-request responses and merged routing trace as one process. 7
    documents per task, so the ranks get 4 and 3 and lm-eval pads rank 1 (the padding's responses
    are appended to that rank's last request, as with `hf`; they never reach a metric)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from hilora_jax.lora.io import save_pool
    from tests.routing_utils import random_pool

    root, model_dir, _ = assets
    tasks_dir = _write_tasks(root, n=7, routed=True, name="mp_tasks")
    pool, _, _ = random_pool(hilora_lm.config, seed=21)
    save_pool(pool, tmp_path / "pool")
    worker = Path(__file__).parent / "mp_lmeval_worker.py"
    env = {k: v for k, v in os.environ.items()
           if k not in ("XLA_FLAGS", "HILORA_COORDINATOR", "HILORA_NUM_PROCESSES",
                        "HILORA_PROCESS_ID")}
    port = str(_free_port())
    runs = {}
    for tag, nproc in (("one", 1), ("two", 2)):
        cfg = {"model_dir": str(model_dir), "tasks_dir": str(tasks_dir),
               "pool_dir": str(tmp_path / "pool"), "seed": 21, "max_length": MAX_LEN,
               "tasks": ["tiny_mc", "tiny_gen"], "out": str(tmp_path / f"{tag}.json"),
               "trace": str(tmp_path / f"{tag}.trace.jsonl"), "mesh": "2x1"}
        (tmp_path / f"{tag}.cfg.json").write_text(json.dumps(cfg))
        runs[tag] = [subprocess.Popen([sys.executable, str(worker), str(tmp_path / f"{tag}.cfg.json"),
                                       str(nproc), str(i), port], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True) for i in range(nproc)]
    for procs in runs.values():
        outs = [p.communicate(timeout=900) for p in procs]
        for p, (_, err) in zip(procs, outs, strict=True):
            assert p.returncode == 0, err[-3000:]
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    assert one["n_requests"] == two["n_requests"] == {"tiny_mc": 7, "tiny_gen": 7}
    assert one["results"] == two["results"]
    for task in ("tiny_mc", "tiny_gen"):
        a, b = one["samples"][task], two["samples"][task]
        assert [x[0] for x in a] == [x[0] for x in b] == list(range(7))
        for (_, ra), (_, rb) in zip(a, b, strict=True):
            if task == "tiny_mc":
                np.testing.assert_allclose([float(r[0][0]) for r in ra],
                                           [float(r[0][0]) for r in rb], atol=1e-5, rtol=0)
                assert [r[0][1] for r in ra] == [r[0][1] for r in rb]
            else:
                # [0]: lm-eval appends its padding requests' responses to the last request of the
                # shorter rank (evaluator.py, the same with `hf`); metrics use the first
                assert [r[0] for r in ra] == [r[0] for r in rb]
    ta = [json.loads(line) for line in (tmp_path / "one.trace.jsonl").read_text().splitlines()]
    tb = [json.loads(line) for line in (tmp_path / "two.trace.jsonl").read_text().splitlines()]
    assert len(ta) == 7 * 3 + 7  # every request once: 3 choices per mc doc, 1 generation per doc
    assert [{k: v for k, v in r.items() if k != "weights"} for r in ta] == \
        [{k: v for k, v in r.items() if k != "weights"} for r in tb]
    for ra, rb in zip(ta, tb, strict=True):
        np.testing.assert_allclose(ra["weights"], rb["weights"], atol=1e-5)
    assert len({tuple(r["candidates"]) for r in ta}) > 1  # routed differently per request


def test_cli_writes_routing_trace_beside_samples(assets, tmp_path, monkeypatch):
    """`python -m hilora_jax.lmeval run ... --output_path --log_samples`: lm-eval's own CLI, and a
    `hilora_trace_<task>_<date>.jsonl` beside each `samples_<task>_<date>.jsonl` with one record
    per request (the oracle: the task's adapter, weight 1, own adapter first)."""
    import sys

    from hilora_jax.lmeval import main

    root, model_dir, _ = assets
    tasks_dir = _write_tasks(root)
    out = tmp_path / "out"
    amap = "tiny_mc:qv_r4;tiny_gen:all_r8_rslora"
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    before = list(sys.argv)
    main(["run", "--model", "hilora", "--model_args",
          f"model={model_dir},pool={root / 'pool'},router=oracle,adapter_map={amap},"
          f"max_length={MAX_LEN}", "--tasks", "tiny_mc,tiny_gen", "--include_path",
          str(tasks_dir), "--batch_size", "4", "--output_path", str(out), "--log_samples"])
    assert sys.argv == before  # main(argv) leaves the caller's sys.argv alone
    for task, adapter, n_req in (("tiny_mc", "qv_r4", 3), ("tiny_gen", "all_r8_rslora", 1)):
        (samples,) = out.rglob(f"samples_{task}_*.jsonl")
        trace = samples.with_name(samples.name.replace("samples_", "hilora_trace_", 1))
        assert trace.exists(), sorted(p.name for p in samples.parent.iterdir())
        docs = sorted(json.loads(line)["doc_id"] for line in samples.read_text().splitlines())
        recs = [json.loads(line) for line in trace.read_text().splitlines()]
        assert sorted({r["doc_id"] for r in recs}) == docs == list(range(6))
        assert len(recs) == 6 * n_req and {r["task"] for r in recs} == {task}
        for r in recs:
            assert (r["router"], r["candidates"], r["weights"]) == ("oracle", [adapter], [1.0])
            assert r["own_in_candidates"] and r["own_first"]


@pytest.mark.real
@pytest.mark.slow
def test_real_smollm2_hilora_eval_and_lm_eval_agree_per_item(tmp_path):
    """The real SmolLM2 (built-in name `smollm2`) on 3 real BIG-bench tasks of the DG benchmark
    (4 test items each): `hilora eval` and `lm_eval --model hilora` (lm-eval's own CLI) agree on
    every item's correctness and on each task's accuracy. Pool: the realistic pool's trained
    SmolLM2 adapters when cached, else a random pool; router `uniform` mixes every adapter in."""
    import importlib.util
    from pathlib import Path

    from hilora_jax.eval import bigbench as bb
    from hilora_jax.io.assets import bigbench_tasks_dir

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("lm_eval_agreement",
                                                  root / "benchmarks/lm_eval_agreement.py")
    agree = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(agree)
    paths = bb.list_tasks(bigbench_tasks_dir())
    examples = []
    for name, cluster in (("bbq_lite_json/gender_identity_ambig", "bbq_lite_json"),
                          ("movie_recommendation", "emotion-social"),
                          ("unit_conversion/si_conversion", "unit_conversion")):
        task = bb.read_task(paths[name], name.replace("/", "."))
        test = bb.split_examples(bb.to_mc_examples(task, cluster), n_test=50)["test"]
        examples += test[:4]
    pool = agree.real_adapters(tmp_path / "pool")
    if pool is None:
        from hilora_jax.io.loading import load_model
        from hilora_jax.lora.io import save_pool
        from tests.routing_utils import random_pool

        rp, _, _ = random_pool(load_model("smollm2", progress=False).config, seed=3)
        pool = save_pool(rp, tmp_path / "pool") and tmp_path / "pool"
    res = agree.agreement(examples, model="smollm2", pool=str(pool), router="uniform",
                          work=tmp_path / "work", batch_size=4)
    assert set(res["tasks"]) == {ex.task for ex in examples}
    for task, t in res["tasks"].items():
        assert t["n"] == 4 and t["items_agree"], (task, t)
        assert t["hilora_eval_acc"] == t["lm_eval_acc"], (task, t)
    assert res["all_agree"]
