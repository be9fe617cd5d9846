"""Evaluation harness: protocols, resume, 8-device and 2-process runs equal to a single device."""

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from eval_utils import mc_examples, word_tokenizer
from hf_utils import make_hf_model
from routing_utils import random_pool

from hilora_jax.eval import runner
from hilora_jax.eval.runner import evaluate, protocol_active
from hilora_jax.inference import Engine
from hilora_jax.io.loading import load_model
from hilora_jax.model import sharding as shd
from hilora_jax.routing import build_router


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    make_hf_model(d, "llama", vocab_size=64, intermediate_size=64)
    model = load_model(d, progress=False)
    pool, emb, _ = random_pool(model.config, seed=21)
    return d, model, Engine(model), pool, emb, word_tokenizer(), mc_examples()


def _strip(res):
    res = dict(res)
    res.pop("timing")
    return res


def test_protocol_filtering(setup):
    _, _, _, pool, _, _, _ = setup
    # pool clusters: lora0,2,4 -> c0; lora1,3 -> c1
    np.testing.assert_array_equal(protocol_active(pool, "lora2", "c0", "seen"), [1, 1, 1, 1, 1])
    np.testing.assert_array_equal(protocol_active(pool, "lora2", "c0", "unseen-within"), [1, 1, 0, 1, 1])
    np.testing.assert_array_equal(protocol_active(pool, "lora2", "c0", "unseen-cross"), [0, 1, 0, 1, 0])
    with pytest.raises(ValueError, match="unknown protocol"):
        protocol_active(pool, "lora2", "c0", "nope")
    with pytest.raises(ValueError, match="no active adapter"):
        protocol_active(pool.subset(["lora0"]), "lora0", "c0", "unseen-within")


@pytest.mark.parametrize("protocol", ["seen", "unseen-within", "unseen-cross"])
def test_routing_respects_protocol(setup, protocol):
    _, _, eng, pool, emb, tok, exs = setup
    router = build_router("hilora", pool, options=dict(embedder=emb))
    res = evaluate(eng, tok, pool, router, exs, protocol=protocol, batch_size=8, progress=False)
    assert res["mean"]["examples"] == len(exs) and res["mean"]["tasks"] == 5
    own_in = res["routing"]["own_in_candidates"]
    if protocol == "seen":
        assert own_in >= 0.9 and res["routing"]["own_first"] >= 0.9
    else:  # the task's own adapter is never used
        assert own_in == 0.0
    assert set(res["clusters"]) == {"c0", "c1"}


def test_oracle_and_base_differ(setup, tmp_path):
    _, _, eng, pool, emb, tok, exs = setup
    base = evaluate(eng, tok, pool, build_router("base", pool), exs, batch_size=8, progress=False,
                    out=tmp_path / "base.json")
    orc = evaluate(eng, tok, pool, build_router("oracle", pool), exs, batch_size=8, progress=False,
                   out=tmp_path / "oracle.json")
    assert orc["routing"]["own_first"] == 1.0
    # the oracle applies each task's own adapter: every choice's log-probability of every example
    # moves away from the base model's (the per-example records keep them)
    def logprobs(name):
        recs = [json.loads(line) for line in (tmp_path / f"{name}.json.partial.jsonl").open()]
        return {r["key"]: np.asarray(r["logprob"]) for r in recs}

    lb, lo = logprobs("base"), logprobs("oracle")
    assert sorted(lb) == sorted(lo) and len(lb) == len(exs)
    assert all(np.abs(lo[k] - lb[k]).min() > 1e-3 for k in lb)
    # per-example correctness: one entry per example, consistent with the per-task accuracy
    for res in (base, orc):
        assert len(res["correct"]) == len(exs) and set(res["correct"].values()) <= {0, 1}
        for task, t in res["tasks"].items():
            hits = [v for k, v in res["correct"].items() if k.rsplit(":", 1)[0] == task]
            assert len(hits) == t["n"] and np.mean(hits) == pytest.approx(t["acc"])


def test_resume_after_interruption_gives_same_results(setup, tmp_path, monkeypatch):
    _, _, eng, pool, emb, tok, exs = setup
    router = build_router("hilora", pool, options=dict(embedder=emb))
    full = evaluate(eng, tok, pool, router, exs, out=tmp_path / "new" / "dir" / "a.json",
                    batch_size=8, progress=False)  # missing parent folders are created
    (tmp_path / "a.json").write_text((tmp_path / "new" / "dir" / "a.json").read_text())
    calls = {"n": 0}
    real = runner.dist.allgather_json

    def dying(obj):  # the run is killed after the second task was scored
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(obj)

    monkeypatch.setattr(runner.dist, "allgather_json", dying)
    with pytest.raises(KeyboardInterrupt):
        evaluate(eng, tok, pool, router, exs, out=tmp_path / "b.json", batch_size=8, progress=False)
    monkeypatch.setattr(runner.dist, "allgather_json", real)
    assert not (tmp_path / "b.json").exists()
    partial = tmp_path / "b.json.partial.jsonl"
    n_done = len(partial.read_text().splitlines())
    assert 0 < n_done < len(exs)
    resumed = evaluate(eng, tok, pool, router, exs, out=tmp_path / "b.json", batch_size=8,
                       progress=False)
    assert resumed["timing"]["resumed_examples"] == n_done
    assert _strip(resumed) == _strip(full)
    assert _strip(json.loads((tmp_path / "b.json").read_text())) == _strip(json.loads((tmp_path / "a.json").read_text()))
    # a different test set under the same out path recomputes everything: the partial records
    # are tagged with a fingerprint of the examples, not only of the configuration
    changed = [dataclasses.replace(exs[0], answer=(exs[0].answer + 1) % len(exs[0].choices)),
               *exs[1:]]
    again = evaluate(eng, tok, pool, router, changed, out=tmp_path / "b.json", batch_size=8,
                     progress=False)
    assert again["timing"]["resumed_examples"] == 0


def test_eight_devices_equal_single_device(setup):
    d, model, eng, pool, emb, tok, exs = setup
    mesh = shd.make_mesh(2, 4)
    seng = Engine(load_model(d, mesh=mesh, progress=False), mesh=mesh)
    spool = pool.shard(mesh)
    a = evaluate(eng, tok, pool, build_router("hilora", pool, options=dict(embedder=emb)), exs,
                 protocol="unseen-cross", batch_size=8, progress=False)
    b = evaluate(seng, tok, spool, build_router("hilora", spool, options=dict(embedder=emb)), exs,
                 protocol="unseen-cross", batch_size=8, progress=False)
    assert _strip(a) == _strip(b)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(setup, tmp_path):
    d = setup[0]
    worker = Path(__file__).parent / "mp_eval_worker.py"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    single = subprocess.run([sys.executable, str(worker), str(d), str(tmp_path / "one.json"), "1",
                             "0", "0"], env=env, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, str(worker), str(d), str(tmp_path / "two.json"),
                               "2", str(i), port], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["timing"]["processes"] == 2 and one["timing"]["processes"] == 1
    assert _strip(one) == _strip(two)


def test_shared_prefix_equals_full_forward(setup):
    """A pool that only adapts layer 1: scores resumed from the cached layer-1 hidden states equal
    the full forward, and the cache is reused across runs."""
    _, model, eng, _, _, tok, exs = setup
    pool, emb, _ = random_pool(model.config, seed=22)
    arr = pool.arrays
    pool.arrays = arr.replace(mask={m: v.at[0].set(False) for m, v in arr.mask.items()})
    assert runner.first_adapted_layer(pool) == 1
    router = build_router("hilora", pool, options=dict(embedder=emb))
    shared = runner.PrefixScorer(eng, 1)
    a = evaluate(eng, tok, pool, router, exs, batch_size=8, progress=False, scorer=shared)
    n_cached = len(shared._cache)
    assert n_cached > 0
    b = evaluate(eng, tok, pool, router, exs, batch_size=8, progress=False,
                 scorer=runner.PrefixScorer(eng, 0))
    evaluate(eng, tok, pool, router, exs, protocol="unseen-cross", batch_size=8, progress=False,
             scorer=shared)
    assert len(shared._cache) == n_cached  # reused, not recomputed
    assert _strip(a)["tasks"] == _strip(b)["tasks"]
    with pytest.raises(ValueError, match="adapts layer"):
        full, emb2, _ = random_pool(model.config, seed=23)
        evaluate(eng, tok, full, build_router("uniform", full), exs, scorer=shared, progress=False)
