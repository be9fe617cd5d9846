"""The `hilora` lm-eval backend on a T5 model against lm-eval's own `hf` backend with
`backend="seq2seq"` (`HFLM`) on the same saved tiny random T5, in fp32.

The tokenizer is a word tokenizer that appends EOS like T5's, so the seq2seq encoding (context with
special tokens, continuation without) matters. Log-likelihoods (several lengths: encoder and decoder
padding, an empty context, a context longer than max_length, a greedy continuation) agree to 1e-4
with identical is_greedy; rolling log-likelihoods agree; greedy generations with stop strings are
identical; a 2-adapter PEFT T5 pool routed with the oracle equals HFLM with each PEFT adapter
(log-likelihoods and generations); HiLoRA-routed batches equal each request routed alone; lm-eval's
command line (`python -m hilora_jax.lmeval`) runs a local task on the T5 dir.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("lm_eval", reason="needs the `lmeval` extra (lm-eval>=0.4.13)")

import torch  # noqa: E402
import transformers as tf  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from tokenizers import processors  # noqa: E402

from tests.eval_utils import word_tokenizer  # noqa: E402
from tests.lmeval_utils import assert_ll_equal, hf_lm, words  # noqa: E402
from tests.lmeval_utils import hilora_lm as make_hilora_lm  # noqa: E402
from tests.t5_utils import ENC_LAYERS, VOCAB, make_hf_t5  # noqa: E402

MAX_LEN = 16  # every encoder input and target fits one length bucket: few compiles
EOS = 2  # the word tokenizer's EOS "w2" (also the model's)
ADAPTERS = {"qv": dict(r=4, lora_alpha=8, target_modules=["q", "v"]),
            "all": dict(r=2, lora_alpha=4, target_modules=["q", "k", "v", "o", "wi_0", "wi_1",
                                                           "wo"])}
ADAPTER_MAP = {"task_a": "qv", "task_b": "all"}


def _words(rng, lo, hi):
    return words(rng, lo, hi, VOCAB)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("t5lmeval")
    model_dir = root / "t5"
    # v1.0 (tied head): HFLM calls `model.tie_weights()` after loading, which under transformers
    # 5 ties an untied v1.1 head to the embeddings, so HFLM would not be the checkpoint's model;
    # as many decoder as encoder blocks: transformers 5's cached T5 generation sizes its cache by
    # `num_layers` (an IndexError with more decoder blocks)
    make_hf_t5(model_dir, "v1.0", seed=3, eos_token_id=EOS, num_decoder_layers=ENC_LAYERS)
    tok = word_tokenizer(VOCAB)
    tok._tokenizer.post_processor = processors.TemplateProcessing(  # appends EOS, as T5's
        single="$A w2", special_tokens=[("w2", EOS)])
    tok.save_pretrained(str(model_dir))
    pool = {}
    for i, (name, kw) in enumerate(ADAPTERS.items()):
        torch.manual_seed(11 + i)
        base = tf.T5ForConditionalGeneration.from_pretrained(str(model_dir)).eval()
        pm = get_peft_model(base, LoraConfig(task_type="SEQ_2_SEQ_LM", init_lora_weights=False,
                                             **kw))
        pm.save_pretrained(str(root / "pool" / name))
        pool[name] = str(root / "pool" / name)
    return root, model_dir, pool


@pytest.fixture(scope="module")
def hilora_lm(assets):
    return make_hilora_lm(assets[1], MAX_LEN)


def _hf(model_dir, **kw):
    return hf_lm(model_dir, MAX_LEN, backend="seq2seq", **kw)


def _greedy_word(model_dir, context: str) -> str:
    """The base model's argmax first decoder token for `context` (a greedy continuation)."""
    tok = tf.AutoTokenizer.from_pretrained(str(model_dir))
    m = tf.T5ForConditionalGeneration.from_pretrained(str(model_dir)).eval()
    with torch.no_grad():
        logits = m(input_ids=torch.as_tensor([tok.encode(context)]),
                   decoder_input_ids=torch.zeros((1, 1), dtype=torch.long)).logits
    return tok.decode([int(logits[0, -1].argmax())])


def _ll_requests(seed=0, task="task_a", n=9):
    rng = np.random.default_rng(seed)
    reqs = [(_words(rng, 1, 14), " " + _words(rng, 1, 7)) for _ in range(n)]
    reqs.append(("", "w7 w8 w9"))  # empty context: the prefix token (EOS) is the encoder input
    reqs.append((_words(rng, 40, 41), " w5 w6"))  # > max_length: the last MAX_LEN tokens
    reqs.append((reqs[0][0] + " ", "w11"))  # trailing context space moves to the continuation
    return [Instance("loglikelihood", {}, r, i, metadata=(task, i, 1)) for i, r in enumerate(reqs)]


def test_t5_loglikelihood_and_rolling_equal_hf_seq2seq(assets, hilora_lm):
    _, model_dir, _ = assets
    assert hilora_lm.backend == "seq2seq" and hilora_lm.max_length == MAX_LEN
    # the seq2seq split: the context keeps the tokenizer's EOS, the continuation gets none
    ctx, cont = hilora_lm._encode_pair("w5 w6", " w7")
    assert (ctx, cont) == ([5, 6, EOS], [7])
    hf = _hf(model_dir)
    reqs = _ll_requests()
    ctx0 = reqs[0].args[0]
    reqs.append(Instance("loglikelihood", {}, (ctx0, " " + _greedy_word(model_dir, ctx0)),
                         len(reqs), metadata=("task_a", len(reqs), 1)))
    ours, ref = hilora_lm.loglikelihood(reqs), hf.loglikelihood(reqs)
    assert_ll_equal(ours, ref)
    assert ours[-1][1] and not all(x[1] for x in ours)  # is_greedy is exercised both ways
    rng = np.random.default_rng(1)
    docs = [_words(rng, 3, 10), _words(rng, 20, 21), _words(rng, 40, 41)]  # 1, 2 and 3 windows
    rr = [Instance("loglikelihood_rolling", {}, (d,), i) for i, d in enumerate(docs)]
    np.testing.assert_allclose(hilora_lm.loglikelihood_rolling(rr), hf.loglikelihood_rolling(rr),
                               atol=1e-4, rtol=0)


def _gen_requests(model_dir, seed=2, n=12, peft=None, task="task_a"):
    """Greedy requests whose outputs end within `max_gen_toks` in both backends, so the cut text
    is the whole comparison (for an encoder-decoder, lm-eval's seq2seq backend lets HF generate up
    to padded context length + max_gen_toks - 1 tokens; ours generates max_gen_toks): from the
    reference's own unstopped output, a stop word first seen at word 3-6 (rows without one are
    kept only when the output is empty, EOS at once). Every other row also has a multi-token stop
    string (cut from the text only)."""
    rng = np.random.default_rng(seed)
    ctxs = [_words(rng, 2, 14) for _ in range(n)] + [_words(rng, 40, 41)]  # the last: truncated
    free = [Instance("generate_until", {}, (c, {"until": ["w99"], "max_gen_toks": 8}), i)
            for i, c in enumerate(ctxs)]
    texts = _hf(model_dir, peft=peft).generate_until(free)
    out = []
    for c, t in zip(ctxs, texts, strict=True):
        w = t.split()
        new = [w[i] for i in range(2, min(len(w), 6)) if w[i] not in w[:i]]
        if not new and w:
            continue
        until = new[:1] or ["w98"]
        if len(out) % 2:
            until.append("w97 w96")
        out.append(Instance("generate_until", {}, (c, {"until": until, "max_gen_toks": 8,
                                                       "do_sample": False}), len(out),
                            metadata=(task, len(out), 1)))
    assert len(out) >= 3, texts
    return out


def test_t5_generate_until_greedy_identical_to_hf_seq2seq(assets, hilora_lm):
    _, model_dir, _ = assets
    reqs = _gen_requests(model_dir)
    ours, ref = hilora_lm.generate_until(reqs), _hf(model_dir).generate_until(reqs)
    assert ours == ref
    assert sum(len(s.split()) >= 2 for s in ours) >= 3  # not all empty / cut at once


def test_t5_oracle_pool_equals_hf_seq2seq_with_peft(assets, hilora_lm):
    from hilora_jax.lmeval import HiLoRALM

    root, model_dir, pool = assets
    amap = ";".join(f"{t}:{a}" for t, a in ADAPTER_MAP.items())
    lm = HiLoRALM(model=str(model_dir), pool=str(root / "pool"), router="oracle",
                  adapter_map=amap, max_length=MAX_LEN, batch_size=4,
                  trace_path=str(root / "trace.jsonl"))
    # the two tasks' requests interleaved: one batch routes each row to its own adapter
    ra, rb = _ll_requests(seed=4, task="task_a", n=3), _ll_requests(seed=5, task="task_b", n=3)
    mixed = [r for pair in zip(ra, rb, strict=True) for r in pair]
    ours = lm.loglikelihood(mixed)
    base = hilora_lm.loglikelihood(mixed)
    for task, reqs in (("task_a", ra), ("task_b", rb)):
        hf = _hf(model_dir, peft=pool[ADAPTER_MAP[task]])
        assert_ll_equal([ours[mixed.index(r)] for r in reqs], hf.loglikelihood(reqs))
    # the adapters change the numbers (a pass is not the base model passing twice)
    assert np.max(np.abs(np.array([x[0] for x in ours]) - np.array([x[0] for x in base]))) > 1e-2
    gen = _gen_requests(model_dir, seed=6, n=4, peft=pool["all"], task="task_b")
    assert lm.generate_until(gen) == _hf(model_dir, peft=pool["all"]).generate_until(gen)
    # the routing trace: one record per request, the task's adapter
    import json

    recs = [json.loads(line) for line in (root / "trace.jsonl").read_text().splitlines()]
    assert len(recs) == len(mixed) + len(gen)
    for r in recs:
        assert (r["router"], r["candidates"]) == ("oracle", [ADAPTER_MAP[r["task"]]])


def test_t5_hilora_router_routes_each_request_from_its_context(assets, hilora_lm):
    """HiLoRA on the T5 pool: batched requests equal each request routed alone (sequence stage
    from its context text) and scored by `T5Engine.score_choices`; routes differ per request and
    change the numbers."""
    import zlib

    from hilora_jax.embed import PrecomputedEmbedder
    from hilora_jax.inference import pad_batch
    from hilora_jax.lmeval import HiLoRALM

    root, model_dir, pool = assets
    means = np.random.default_rng(0).standard_normal((len(pool), 6)) * 6.0

    def embed(text):  # "task{i} ..." near means[i] (deterministic noise per text)
        noise = np.random.default_rng(zlib.crc32(text.encode())).standard_normal(6)
        return means[int(text.split()[0][4:])] + noise

    manifest = {"adapters": {n: {"path": p, "samples": [f"task{i} s{j}" for j in range(10)]}
                             for i, (n, p) in enumerate(pool.items())}}
    lm = HiLoRALM.create_from_arg_obj(
        {"model": str(model_dir), "pool": manifest, "router": "hilora",
         "router_options": {"embedder": PrecomputedEmbedder(embed, dim=6)}, "router.k": 2,
         "max_length": MAX_LEN}, {"batch_size": 4})
    rng = np.random.default_rng(9)
    reqs = [Instance("loglikelihood", {}, (f"task{i % 2} q{i} " + _words(rng, 2, 8),
                                           " " + _words(rng, 1, 4)), i) for i in range(4)]
    ours = lm.loglikelihood(reqs)
    alone, routes = [], set()
    for r in reqs:
        ctx, cont = lm._encode_pair(*r.args)
        routing = lm.router.route([r.args[0]])
        info = routing.info
        used = info["cand_valid"][0]
        routes.add((tuple(info["cand_idx"][0][used]), tuple(info["n_rocs"][0][used])))
        # the batched call's shapes (4 copies of the row, one bucket): no new compile
        ids, mask = pad_batch([ctx] * 4, MAX_LEN, 0, side="right")
        tgt, tmask = pad_batch([cont] * 4, MAX_LEN, 0, side="right")
        hook = lm.router.route([r.args[0]] * 4).hook
        alone.append(float(lm.engine.score_targets(ids, mask, tgt[:, None], tmask[:, None],
                                                   lora=hook)[0, 0]))
    np.testing.assert_allclose([x[0] for x in ours], alone, atol=1e-4, rtol=0)
    assert len(routes) > 1  # requests really were routed differently
    base = [x[0] for x in hilora_lm.loglikelihood(reqs)]
    assert np.max(np.abs(np.array(alone) - base)) > 1e-2


def test_t5_lm_eval_command_line_run(assets, tmp_path, monkeypatch):
    """`python -m hilora_jax.lmeval run` (lm-eval's own command line, in process) on the T5 dir
    with the oracle-routed pool on a local multiple-choice task: every sample's log-likelihoods
    equal HFLM seq2seq with the task's PEFT adapter, and the routing trace beside the samples
    names that adapter for every request (routed generation: the oracle test above)."""
    import json
    import sys

    from hilora_jax.lmeval import main
    from tests.test_lmeval import _write_tasks

    root, model_dir, pool = assets
    tasks_dir = _write_tasks(tmp_path, n=4)
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    main(["run", "--model", "hilora", "--model_args",
          f"model={model_dir},pool={root / 'pool'},router=oracle,"
          f"adapter_map=tiny_mc:qv,max_length={MAX_LEN}", "--tasks", "tiny_mc", "--include_path", str(tasks_dir), "--batch_size", "4",
          "--output_path", str(out), "--log_samples"])
    (mc,) = out.rglob("samples_tiny_mc_*.jsonl")
    samples = [json.loads(line) for line in mc.read_text().splitlines()]
    assert len(samples) == 4
    reqs = [Instance("loglikelihood", {}, (a["arg_0"], a["arg_1"]), i)
            for s in samples for i, a in enumerate(s["arguments"].values())]
    want = [lp for lp, _ in _hf(model_dir, peft=pool["qv"]).loglikelihood(reqs)]
    got = [float(r[0][0]) for s in samples for r in s["resps"]]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    (trace,) = out.rglob("hilora_trace_tiny_mc_*.jsonl")
    recs = [json.loads(line) for line in trace.read_text().splitlines()]
    assert sorted((r["doc_id"], r["idx"]) for r in recs) == [(d, c) for d in range(4)
                                                             for c in range(3)]
    assert all((r["router"], r["candidates"]) == ("oracle", ["qv"]) for r in recs)
