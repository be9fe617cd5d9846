"""HiLoRA router and baselines: reference parity, properties, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference_hilora as ref
from hf_utils import make_hf_model, padded_batch
from routing_utils import random_pool, reference_delta

from hilora_jax.inference import Engine
from hilora_jax.io.loading import load_model
from hilora_jax.lora.pool import GatedHook
from hilora_jax.model import sharding as shd
from hilora_jax.routing import build_router
from hilora_jax.routing.hooks import HiLoRAHook
from hilora_jax.routing.routers import pool_fingerprint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("m")
    make_hf_model(d, "llama", vocab_size=64, intermediate_size=64)
    model = load_model(d, progress=False)
    return d, model, Engine(model)


@pytest.mark.parametrize("strategy", ["dense", "gathered"])
@pytest.mark.parametrize("kappa_mode,mode_k", [("sqrt", 3), ("none", 1), ("mean", 2)])
def test_hilora_matches_float64_reference(tiny, strategy, kappa_mode, mode_k):
    _, model, _ = tiny
    pool, emb, _ = random_pool(model.config, seed=1)
    router = build_router("hilora", pool, options=dict(embedder=emb, strategy=strategy,
                                                       kappa=kappa_mode, k=mode_k, gamma=0.5))
    texts = ["task0 q1", "task3 q2", "task1 q1", "far away text", "task4 q0"]
    routing = router.route(texts)
    # sequence stage == reference (Gaussians fitted in float64 with explicit covariances)
    z = emb(texts)
    fits = ref.fit([emb(list(pool.samples[n])) for n in pool.names])
    dec = []
    for b in range(len(texts)):
        s = ref.log_likelihood(fits, z[b : b + 1])[0] / z.shape[1]
        d = ref.sequence_decision(s, np.asarray(pool.arrays.ranks), np.ones(len(pool), bool),
                                  k=mode_k, gamma=0.5)
        dec.append(d)
        c = len(d["cand"])
        np.testing.assert_array_equal(routing.info["cand_idx"][b][:c], d["cand"])
        assert not routing.info["cand_valid"][b][c:].any()
        np.testing.assert_array_equal(routing.info["n_rocs"][b][:c], d["n"])
        assert routing.info["budget"][b] == d["budget"]
        np.testing.assert_allclose(routing.info["scores"][b], s, rtol=1e-4, atol=1e-3)
    assert len({tuple(d["cand"]) for d in dec}) > 2, "test inputs should route differently"
    rng = np.random.default_rng(0)
    for name in pool.arrays.modules:
        d_in = pool.arrays.A[name].shape[-1]
        x = rng.standard_normal((len(texts), 4, d_in)).astype(np.float32)
        for layer in range(model.config.num_layers):
            got = np.asarray(jax.jit(lambda h, x, layer=layer, name=name: h(layer, name, x))(routing.hook, x))
            want = reference_delta(pool, x.astype(np.float64), name, layer, dec, kappa_mode)
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def _hilora_logits(eng, router, texts, ids, mask, **kw):
    r = router.route(texts, **kw)
    return np.asarray(eng.forward(ids, mask, lora=r.hook)), r


def test_dense_equals_gathered_and_decisions_do_not_recompile(tiny):
    _, model, eng = tiny
    pool, emb, _ = random_pool(model.config, seed=2)
    texts = ["task0 q0", "task2 q5", "task4 q1"]
    ids, mask = padded_batch(np.random.default_rng(0), (7, 4, 9), 9, vocab=64)
    dense = build_router("hilora", pool, options=dict(embedder=emb, strategy="dense", trim=False))
    gath = build_router("hilora", pool, options=dict(embedder=emb, strategy="gathered", trim=False))
    a, _ = _hilora_logits(eng, dense, texts, ids, mask)
    b, _ = _hilora_logits(eng, gath, texts, ids, mask)
    assert np.abs(a - b).max() <= 1e-5
    base = np.asarray(eng.forward(ids, mask))
    assert np.abs(a - base).max() > 1e-3, "routing must change the logits"
    n_compiled = eng._forward._cache_size()
    _hilora_logits(eng, gath, ["task1 q3", "task3 q3", "nothing like it"], ids, mask)
    assert eng._forward._cache_size() == n_compiled


def test_padding_and_batchmates_do_not_change_a_sequence(tiny):
    _, model, eng = tiny
    pool, emb, _ = random_pool(model.config, seed=3)
    router = build_router("hilora", pool, options=dict(embedder=emb))
    rng = np.random.default_rng(5)
    seq = list(rng.integers(3, 64, size=6))
    alone_ids = np.array([seq]), np.ones((1, 6), bool)
    a, ra = _hilora_logits(eng, router, ["task1 q9"], *alone_ids)
    ids = np.zeros((3, 11), np.int32)
    mask = np.zeros((3, 11), bool)
    ids[0], mask[0] = rng.integers(3, 64, size=11), True
    ids[1, 5:], mask[1, 5:] = seq, True  # same sequence, left-padded, new batch-mates
    ids[2, 2:], mask[2, 2:] = rng.integers(3, 64, size=9), True
    b, rb = _hilora_logits(eng, router, ["task3 q1", "task1 q9", "task0 q2"], ids, mask)
    assert np.abs(a[0] - b[1, 5:]).max() <= 1e-5
    for k in ("cand_idx", "n_rocs", "budget"):
        np.testing.assert_array_equal(ra.info[k][0], rb.info[k][1])


def test_sharded_equals_unsharded(tiny):
    d, model, eng = tiny
    pool, emb, _ = random_pool(model.config, seed=4)
    mesh = shd.make_mesh(2, 4)
    sm = load_model(d, mesh=mesh, progress=False)
    seng = Engine(sm, mesh=mesh)
    spool = pool.shard(mesh)
    texts = ["task0 q0", "task1 q1", "task2 q2", "task3 q3"]
    ids, mask = padded_batch(np.random.default_rng(1), (5, 8, 3, 8), 8, vocab=64)
    a, _ = _hilora_logits(eng, build_router("hilora", pool, options=dict(embedder=emb)), texts, ids, mask)
    b, _ = _hilora_logits(seng, build_router("hilora", spool, options=dict(embedder=emb)), texts, ids, mask)
    assert np.abs(a - b).max() <= 1e-5
    ga = eng.generate([list(r[m]) for r, m in zip(ids, mask, strict=True)], max_new_tokens=6, stop_tokens=[-1],
                      lora=build_router("hilora", pool, options=dict(embedder=emb)).route(texts).hook)
    gb = seng.generate([list(r[m]) for r, m in zip(ids, mask, strict=True)], max_new_tokens=6, stop_tokens=[-1],
                       lora=build_router("hilora", spool, options=dict(embedder=emb)).route(texts).hook)
    np.testing.assert_array_equal(ga.tokens, gb.tokens)


def test_full_budget_over_all_candidates_equals_dense_sum(tiny):
    _, model, eng = tiny
    pool, emb, _ = random_pool(model.config, seed=6)
    n = len(pool)
    x = np.random.default_rng(2).standard_normal((2, 5, 48)).astype(np.float32)
    cand = jnp.tile(jnp.arange(n)[None], (2, 1))
    hook = HiLoRAHook(pool.arrays, cand, jnp.ones((2, n), bool), jnp.tile(pool.arrays.ranks[None], (2, 1)),
                      jnp.ones((2,)))
    dense_sum = GatedHook(pool.arrays, jnp.ones((2, n)))
    for name in pool.arrays.modules:
        xx = x if pool.arrays.A[name].shape[-1] == 48 else np.random.default_rng(3).standard_normal((2, 5, 64)).astype(np.float32)
        for layer in range(2):
            np.testing.assert_allclose(np.asarray(hook(layer, name, xx)),
                                       np.asarray(dense_sum(layer, name, xx)), atol=1e-5)
    # through the router: out-of-distribution prompts (all scores < 0) with k = N make every
    # adapter a candidate; gamma=1, kappa none -> the sum of all LoRAs
    texts = ["far away text one", "far away text two"]
    r = build_router("hilora", pool, options=dict(embedder=emb, gamma=1.0, kappa="none", k=n,
                                                  max_candidates=n))
    routing = r.route(texts)
    assert routing.info["cand_valid"].all() and (routing.info["n_rocs"] == np.asarray(pool.arrays.ranks)[routing.info["cand_idx"]]).all()
    ids, mask = padded_batch(np.random.default_rng(1), (6, 6), 6, vocab=64)
    a = np.asarray(eng.forward(ids, mask, lora=routing.hook))
    b = np.asarray(eng.forward(ids, mask, lora=GatedHook(pool.arrays, jnp.ones((2, n)))))
    # fp32, relative to the logit scale: the default `auto` (packed) strategy sums the ROCs in
    # another order than the dense mixture (measured 1.3e-5 on logits up to ~2.6)
    assert np.abs(a - b).max() <= 1e-5 * max(1.0, float(np.abs(b).max()))


def test_single_lora_pool_with_full_budget_is_that_lora(tiny):
    _, model, eng = tiny
    pool, emb, _ = random_pool(model.config, ranks=(8,), seed=7, skip_layer_for=None)
    r = build_router("hilora", pool, options=dict(embedder=emb, gamma=1.0, kappa="sqrt"))
    routing = r.route(["task0 q1", "something else entirely"])
    assert (routing.info["n_rocs"][:, 0] == 8).all()
    ids, mask = padded_batch(np.random.default_rng(4), (5, 7), 7, vocab=64)
    a = np.asarray(eng.forward(ids, mask, lora=routing.hook))
    b = np.asarray(eng.forward(ids, mask, lora=GatedHook(pool.arrays, jnp.ones((2, 1)))))
    assert np.abs(a - b).max() <= 1e-5


def test_separated_tasks_route_to_their_own_lora(tiny):
    _, model, _ = tiny
    pool, emb, _ = random_pool(model.config, ranks=(8,) * 8, seed=8, emb_dim=32, spread=4.0)
    router = build_router("hilora", pool, options=dict(embedder=emb))
    texts = [f"task{i} q{j}" for i in range(8) for j in range(50)]
    info = router.route(texts).info
    top = info["cand_idx"][:, 0]
    truth = np.repeat(np.arange(8), 50)
    assert (top == truth).mean() >= 0.99


def test_protocol_subsets_exclude_adapters_without_recompiling(tiny):
    _, model, eng = tiny
    pool, emb, _ = random_pool(model.config, seed=9)
    texts = ["task1 q0", "task1 q1"]
    # trim=False: fixed candidate slots, so nothing at all recompiles (with the default trimming a
    # batch compiles one of at most log2(max_candidates)+1 slot variants)
    full = build_router("hilora", pool, options=dict(embedder=emb, trim=False)).route(texts)
    assert (full.info["cand_idx"][:, 0] == 1).all()
    view = pool.subset([n for n in pool.names if n != "lora1"])
    held = build_router("hilora", view, options=dict(embedder=emb, trim=False)).route(texts)
    assert not ((held.info["cand_idx"] == 1) & held.info["cand_valid"]).any()
    ids, mask = padded_batch(np.random.default_rng(0), (4, 4), 4, vocab=64)
    eng.forward(ids, mask, lora=full.hook)
    n = eng._forward._cache_size()
    eng.forward(ids, mask, lora=held.hook)
    assert eng._forward._cache_size() == n
    # every router ignores the held-out adapter: under the view, lora1's weights can change
    # without changing the logits; on the full pool the same change does change them
    arr = pool.arrays
    pert = pool._replace(arr.replace(
        A={m: v.at[:, 1].multiply(-3.0) for m, v in arr.A.items()},
        B={m: v.at[:, 1].multiply(2.0) for m, v in arr.B.items()}))
    pert_view = pert.subset([n for n in pool.names if n != "lora1"])
    for name in ("uniform", "retrieval", "arrow", "roc-fixed"):
        opts = dict(embedder=emb) if name == "retrieval" else {}

        def logits(p, name=name, opts=opts):
            h = build_router(name, p, options=opts).route(texts)
            if "weights" in h.info:
                assert (h.info["weights"][:, 1] == 0).all() == (not p.arrays.active[1])
            return np.asarray(eng.forward(ids, mask, lora=h.hook))

        assert np.abs(logits(pert) - logits(pool)).max() > 1e-3, name  # lora1 matters when active
        np.testing.assert_array_equal(logits(pert_view), logits(view), err_msg=name)


def test_routing_trace(tiny):
    _, model, eng = tiny
    pool, emb, _ = random_pool(model.config, seed=10)
    routing = build_router("hilora", pool, options=dict(embedder=emb)).route(["task2 q1"])
    ids, mask = padded_batch(np.random.default_rng(0), (6,), 6, vocab=64)
    logits, trace = eng.forward(ids, mask, lora=routing.hook, trace=True)
    assert set(trace) == {f"{li}.{m}" for li in range(2) for m in pool.arrays.modules} | {"attention_mask"}
    np.testing.assert_array_equal(trace["attention_mask"], mask)
    fired = np.asarray(trace["1.q_proj"]["fired"])  # B T C
    n_mod = np.asarray(trace["1.q_proj"]["n_module"])  # B C
    np.testing.assert_array_equal(fired, np.broadcast_to(n_mod[:, None], fired.shape))
    assert "budget" in routing.describe(0)


@pytest.mark.parametrize("name", ["uniform", "retrieval", "roc-fixed", "arrow", "oracle"])
def test_baselines_run_and_differ_from_base(tiny, name):
    _, model, eng = tiny
    pool, emb, _ = random_pool(model.config, seed=11)
    opts = {"embedder": emb} if name == "retrieval" else {}
    r = build_router(name, pool, options=opts)
    kw = {"adapter_names": ["lora0", None]} if name == "oracle" else {}
    routing = r.route(["task0 q0", "task3 q3"], **kw)
    ids, mask = padded_batch(np.random.default_rng(0), (5, 5), 5, vocab=64)
    a = np.asarray(eng.forward(ids, mask, lora=routing.hook))
    base = np.asarray(eng.forward(ids, mask))
    assert np.abs(a[0] - base[0]).max() > 1e-4
    if name == "oracle":  # the row without an adapter is the base model
        assert np.abs(a[1] - base[1]).max() <= 1e-5
    if name == "retrieval":
        assert routing.info["weights"][0, 0] == pytest.approx(1 / 3)


def test_retrieval_fusion_averages_parameters(tiny):
    _, model, eng = tiny
    pool, emb, _ = random_pool(model.config, ranks=(4, 4, 4), seed=12, skip_layer_for=None)
    r = build_router("retrieval", pool, options=dict(embedder=emb, combine="fusion", k=2))
    routing = r.route(["task0 q0"])
    w = routing.info["weights"][0]
    x = np.random.default_rng(0).standard_normal((1, 3, 48)).astype(np.float32)
    got = np.asarray(routing.hook(0, "q_proj", x))
    A = np.asarray(pool.arrays.A["q_proj"][0])
    B = np.asarray(pool.arrays.B["q_proj"][0])
    S = np.asarray(pool.arrays.scale["q_proj"][0])
    A_f = np.einsum("a,ard->rd", w, A)
    B_f = np.einsum("a,ar,are->re", w, S, B)
    np.testing.assert_allclose(got, (x @ A_f.T) @ B_f, atol=1e-5)


def test_bad_input(tiny):
    _, model, _ = tiny
    pool, emb, _ = random_pool(model.config, seed=13)
    with pytest.raises(ValueError, match="no active adapters"):
        build_router("hilora", pool.subset(np.zeros(len(pool), bool)), options=dict(embedder=emb))
    nosamp = pool.subset(np.ones(len(pool), bool))
    nosamp.samples = {**nosamp.samples, "lora2": None}
    with pytest.raises(ValueError, match=r"missing for \['lora2'\]"):
        build_router("hilora", nosamp, options=dict(embedder=emb))
    one = pool.subset(np.ones(len(pool), bool))
    one.samples = {**one.samples, "lora1": ("task1 s0",)}
    with pytest.raises(ValueError, match="lora1"):
        build_router("hilora", one, options=dict(embedder=emb))
    r = build_router("hilora", pool, options=dict(embedder=emb))
    with pytest.raises(ValueError, match="NaN|non-finite"):
        r.route(["x"], embeddings=np.full((1, 12), np.nan, np.float32))
    with pytest.raises(ValueError, match="gamma"):
        build_router("hilora", pool, options=dict(embedder=emb, gamma=0.0))
    with pytest.raises(TypeError, match="unknown options"):
        build_router("uniform", pool, options=dict(bogus=1))
    with pytest.raises(ValueError, match="unknown router"):
        build_router("nope", pool)


def test_sample_mode_is_seeded_per_sequence(tiny):
    _, model, _ = tiny
    pool, emb, _ = random_pool(model.config, seed=14)
    r = build_router("hilora", pool, options=dict(embedder=emb, preset="paper", seed=3))
    a = r.route(["task0 q0", "task2 q1"]).info
    b = r.route(["task4 q4", "task2 q1"]).info
    np.testing.assert_array_equal(a["n_rocs"][1], b["n_rocs"][1])
    assert (a["n_rocs"].sum(1) == a["budget"]).all()


def test_trimmed_slots_and_sparse_mixtures_are_exact(tiny):
    """HiLoRA's token stage only sees the slots that hold ROCs; oracle/retrieval gather their
    adapters: both equal the untrimmed / dense-weight computations."""
    _, model, eng = tiny
    pool, emb, _ = random_pool(model.config, seed=15)
    texts = ["task0 q0", "task3 q1", "far away text"]
    ids, mask = padded_batch(np.random.default_rng(0), (5, 7, 3), 7, vocab=64)
    trimmed = build_router("hilora", pool, options=dict(embedder=emb)).route(texts)
    full = build_router("hilora", pool, options=dict(embedder=emb, trim=False)).route(texts)
    assert trimmed.hook.cand_idx.shape[1] < full.hook.cand_idx.shape[1]
    a = np.asarray(eng.forward(ids, mask, lora=trimmed.hook))
    b = np.asarray(eng.forward(ids, mask, lora=full.hook))
    assert np.abs(a - b).max() <= 1e-5
    for name, opts in (("retrieval", dict(embedder=emb)), ("oracle", {})):
        kw = {"adapter_names": ["lora1", "lora4", None]} if name == "oracle" else {}
        r = build_router(name, pool, options=opts).route(texts, **kw)
        dense = GatedHook(pool.arrays, jnp.asarray(r.info["weights"]))
        a = np.asarray(eng.forward(ids, mask, lora=r.hook))
        b = np.asarray(eng.forward(ids, mask, lora=dense))
        assert np.abs(a - b).max() <= 1e-5, name


def test_pool_fingerprint_sees_every_element(tiny):
    _, model, _ = tiny
    pool, _, _ = random_pool(model.config, seed=13)
    fp = pool_fingerprint(pool)
    assert fp == pool_fingerprint(random_pool(model.config, seed=13)[0])  # content, not identity
    a = np.array(pool.arrays.A["down_proj"])
    assert a[:-1].nbytes > 4096  # the changed element lies past the first 4 KB
    a[-1, -1, 1, -3] += 1e-3  # one element deep inside the array (far past its first 4 KB)
    changed = pool._replace(pool.arrays.replace(A={**pool.arrays.A, "down_proj": jnp.asarray(a)}))
    assert pool_fingerprint(changed) != fp
    assert pool_fingerprint(pool.subset(pool.names[1:])) != fp  # the active set counts


def test_int8_pack_router_option_in_the_model(tiny):
    """`hilora` with `pack_weights="int8"` (an int8 `RocPack`, a float32 scale per ROC) through
    the Engine: the same sequence decisions, and the logits of the float pack of the pool whose
    ROCs are those int8 rows dequantised (the scales fold in exactly); an unknown format is
    refused before routing."""
    from hilora_jax.routing.hooks import quantize_rows

    _, model, eng = tiny
    pool, emb, _ = random_pool(model.config, seed=16)
    texts = ["task0 q0", "task2 q5", "task4 q1"]
    ids, mask = padded_batch(np.random.default_rng(1), (7, 4, 9), 9, vocab=64)
    with pytest.raises(ValueError, match="pack_weights must be one of"):
        build_router("hilora", pool, options=dict(embedder=emb, pack_weights="int4"))

    def deq(a):
        q, sc = quantize_rows(a)
        return q.astype(jnp.float32) * sc[..., None]

    pool_deq = pool._replace(pool.arrays.replace(A={m: deq(a) for m, a in pool.arrays.A.items()},
                                                 B={m: deq(b) for m, b in pool.arrays.B.items()}))
    hooks = {"int8": build_router("hilora", pool, options=dict(
                 embedder=emb, strategy="packed", pack_weights="int8")).route(texts).hook}
    for name, p in (("float", pool), ("dequantized", pool_deq)):
        hooks[name] = build_router("hilora", p, options=dict(embedder=emb, strategy="packed")
                                   ).route(texts).hook
    assert hooks["int8"].pack.weights == "int8" and hooks["float"].pack.weights is None
    for f in ("cand_idx", "cand_valid", "n_rocs", "kappa"):
        np.testing.assert_array_equal(np.asarray(getattr(hooks["int8"], f)),
                                      np.asarray(getattr(hooks["float"], f)))
    base = np.asarray(eng.forward(ids, mask))
    out = {k: np.asarray(eng.forward(ids, mask, lora=h)) for k, h in hooks.items()}
    effect = np.abs(out["float"] - base).max()
    assert effect > 1e-3 and np.abs(out["int8"] - out["float"]).max() > 0
    np.testing.assert_allclose(out["int8"], out["dequantized"], rtol=0, atol=1e-5 * effect)

def test_packed_and_auto_strategies_equal_dense_in_the_model(tiny):
    """`packed` (valid ROCs packed by rank, one response matmul per shared input) and `auto`
    give the dense reference's logits, routing trace and greedy tokens through the Engine
    (prefill and cached decode), and new decisions never recompile."""
    _, model, eng = tiny
    pool, emb, _ = random_pool(model.config, seed=16)
    texts = ["task0 q0", "task2 q5", "task4 q1"]
    ids, mask = padded_batch(np.random.default_rng(1), (7, 4, 9), 9, vocab=64)
    router = build_router("hilora", pool, options=dict(embedder=emb, strategy="dense",
                                                       trim=False, max_candidates=4))
    hook = router.route(texts).hook
    want, want_aux = eng.forward(ids, mask, lora=hook, trace=True)
    base = np.asarray(eng.forward(ids, mask))
    assert np.abs(np.asarray(want) - base).max() > 1e-3, "routing must change the logits"
    prompts = [list(r[m]) for r, m in zip(ids, mask, strict=True)]
    want_gen = eng.generate(prompts, max_new_tokens=5, lora=hook).tokens
    for strategy in ("packed", "auto"):
        h = hook.prepared(strategy)
        got, aux = eng.forward(ids, mask, lora=h, trace=True)
        assert np.abs(np.asarray(got) - np.asarray(want)).max() <= 1e-5, strategy
        for k, v in want_aux.items():
            if k != "attention_mask":
                np.testing.assert_array_equal(np.asarray(aux[k]["fired"]), np.asarray(v["fired"]))
        np.testing.assert_array_equal(eng.generate(prompts, max_new_tokens=5, lora=h).tokens,
                                      want_gen)
    n_compiled = eng._forward._cache_size()
    h2 = router.route(["task1 q3", "task3 q3", "nothing like it"]).hook.prepared("packed")
    eng.forward(ids, mask, lora=h2, trace=True)
    assert eng._forward._cache_size() == n_compiled
