"""One home per fact (issue 12): the projection table, the one PEFT writer, explicit router state,
the one scoring path and the model's composable pieces. Small random models; no HF files."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from routing_utils import random_pool

from hilora_jax.inference import Engine
from hilora_jax.io.peft import AdapterError, read_adapter, write_adapter
from hilora_jax.model.config import ModelConfig
from hilora_jax.model.llama import CausalLM
from hilora_jax.model.projections import (
    LLAMA,
    MODULES,
    module_shapes,
    projection,
    shared_input_groups,
)
from hilora_jax.model.sharding import PARAM_AXES, lora_axes, param_logical_axes
from hilora_jax.routing import build_router
from hilora_jax.routing.routers import RouterCache

CFG = ModelConfig(vocab_size=61, hidden_size=48, intermediate_size=40, num_layers=3, num_heads=6,
                  num_kv_heads=2, head_dim=8, max_position_embeddings=128)


def test_projection_table_is_the_one_source():
    assert MODULES == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    # the shapes the model's Linear layers get are the table's
    model = CausalLM(CFG)
    layer = model.model.layers[0]
    for p in LLAMA:
        kern = getattr(getattr(layer, p.block), p.name).kernel
        assert kern.shape == p.shape(CFG) == module_shapes(CFG)[p.name] == CFG.module_shapes()[p.name]
    assert module_shapes(CFG)["k_proj"] == (48, 16) and module_shapes(CFG)["down_proj"] == (40, 48)
    # the sharding rules of kernels, biases and LoRA A/B are the table's axes (the old literal table)
    old = {"q_proj": ("embed", "q_heads"), "k_proj": ("embed", "kv_heads"),
           "v_proj": ("embed", "kv_heads"), "o_proj": ("q_heads", "embed"),
           "gate_proj": ("embed", "mlp"), "up_proj": ("embed", "mlp"), "down_proj": ("mlp", "embed")}
    for m, (i, o) in old.items():
        assert param_logical_axes(f"model.layers.3.{projection(m).block}.{m}.kernel", 2) == (i, o)
        assert param_logical_axes(f"model.layers.0.{projection(m).block}.{m}.bias", 1) == (o,)
        assert lora_axes(m, "A")[-1] == i and lora_axes(m, "B")[-1] == o
        # weight-only int8: the per-output-channel scale follows the kernel's output axis
        assert param_logical_axes(f"model.layers.1.{projection(m).block}.{m}.scale", 1) == (o,)
        # int4: the groups follow the kernel's input axis, the channels its output axis
        assert param_logical_axes(f"model.layers.1.{projection(m).block}.{m}.kernel4", 3) == (
            i, None, o)
        for pair in ("group_scale", "group_min"):
            assert param_logical_axes(f"model.layers.2.{projection(m).block}.{m}.{pair}", 2) == (i, o)
    # kernel, bias, int8 scale, int4 codes and pairs per projection; embedding, norms, lm_head
    # kernel, scale, codes and pairs
    assert len(PARAM_AXES) == 5 * len(LLAMA) + 6
    groups = shared_input_groups()
    assert groups[:2] == (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
    # then T5's (model.projections.T5): self-attention q/k/v, cross-attention k/v, wi*
    assert ("decoder.EncDecAttention.k", "decoder.EncDecAttention.v") in groups[2:]
    assert all(n.startswith(("encoder.", "decoder.")) for g in groups[2:] for n in g)
    assert projection("up_proj").module_key(4) == "model.layers.4.mlp.up_proj"
    with pytest.raises(KeyError, match=r"'qkv_proj' is not an adaptable projection \(known: q_proj"):
        projection("qkv_proj")


def test_write_adapter_round_trips_rows_and_refuses_bad_config(tmp_path):
    rng = np.random.default_rng(0)
    mods = {(1, "q_proj"): (rng.standard_normal((4, 48)), rng.standard_normal((4, 48))),
            (2, "down_proj"): (rng.standard_normal((4, 40)), rng.standard_normal((4, 48)))}
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8,
           "target_modules": r"model\.layers\.(1\.self_attn\.q_proj|2\.mlp\.down_proj)"}
    out = write_adapter(tmp_path / "ad", cfg, mods, extra_files={"note.txt": "x"})
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json",
                                                    "adapter_model.safetensors", "note.txt"]
    assert json.loads((out / "adapter_config.json").read_text()) == cfg
    ad = read_adapter(out, CFG)
    assert set(ad.modules) == set(mods)
    for k, (a, b) in mods.items():  # one layout: rows in, rows out (PEFT's B transposed on disk)
        np.testing.assert_array_equal(ad.modules[k][0], a.astype(np.float32))
        np.testing.assert_array_equal(ad.modules[k][1], b.astype(np.float32))
        assert ad.modules[k][2] == 2.0
    with pytest.raises(AdapterError, match="use_dora"):  # checked before anything is written
        write_adapter(tmp_path / "bad", {**cfg, "use_dora": True}, mods)
    with pytest.raises(ValueError, match=r"must be \[r, d_in\] and \[r, d_out\]"):
        write_adapter(tmp_path / "bad", cfg, {(1, "q_proj"): (np.zeros((4, 48)), np.zeros((3, 48)))})
    assert not (tmp_path / "bad").exists()


def test_router_state_is_explicit_and_shareable():
    pool, emb, _ = random_pool(CFG, seed=3)
    calls = []

    def counting(texts):
        calls.append(len(texts))
        return emb(texts)

    counting.name = "counting"
    cache = RouterCache()
    r1 = build_router("hilora", pool, options={"embedder": counting}, cache=cache)
    n_samples = sum(calls)
    assert n_samples == sum(len(pool.samples[n]) for n in pool.names)
    r2 = build_router("hilora", pool, options={"embedder": counting, "gamma": 0.7}, cache=cache)
    r3 = build_router("retrieval", pool, options={"embedder": counting}, cache=cache)
    assert sum(calls) == n_samples  # sample embeddings built once for the three routers
    assert r2.bank is r1.bank and r3.cache is cache
    alone = build_router("hilora", pool, options={"embedder": counting})
    assert sum(calls) == 2 * n_samples and alone.cache is not cache  # no hidden sharing
    a1 = build_router("arrow", pool, cache=cache)
    a2 = build_router("arrow", pool.subset(pool.names[:3]), cache=cache)  # same A: same prototypes
    assert a2.hook.protos is a1.hook.protos
    r1.route(["task0 q1"])
    a1.route(["task0 q1"])
    assert not any(k.startswith("_") for k in vars(pool))  # a pool stays a plain value
    assert not build_router("hilora", pool, options={"embedder": emb}).needs_task_labels
    assert build_router("oracle", pool).needs_task_labels


def test_one_scoring_path_and_model_pieces():
    model = CausalLM(CFG, rngs=None)
    eng = Engine(model)
    pool, _, _ = random_pool(CFG, seed=4)
    hook = pool.adapter_hook([0.5, 0, 1.0, 0, 0.25], batch=3)
    rng = np.random.default_rng(1)
    ids = rng.integers(1, 61, (3, 12)).astype(np.int32)
    mask = np.ones_like(ids, bool)
    mask[1, :5] = False  # left padding
    tm = np.zeros_like(mask)
    tm[:, -3:] = True
    full_sum, full_tok = eng.score(ids, mask, tm, lora=hook)  # default tail: every position
    assert full_tok.shape == (3, 11)
    logits = np.asarray(eng.forward(ids, mask, lora=hook))
    lp = np.take_along_axis(np.asarray(jax_log_softmax(logits[:, :-1])), ids[:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(full_sum), (lp * tm[:, 1:]).sum(1), rtol=1e-5, atol=1e-5)
    tail_sum, tail_tok = eng.score(ids, mask, tm, lora=hook, tail=4)
    assert tail_tok.shape == (3, 4)
    np.testing.assert_allclose(np.asarray(tail_sum), np.asarray(full_sum), rtol=1e-5, atol=1e-5)
    # resuming from the hidden state after layer 1 (the pool adapts every layer: the base prefix
    # differs, so use the adapted one) equals the full pass
    _, h1 = eng.forward(ids, mask, lora=hook, logits_at="none", hidden_layer=1)
    h_base = np.asarray(model.hidden(jnp.asarray(ids), jnp.asarray(mask), layer=1, lora=hook))
    np.testing.assert_allclose(np.asarray(h1), h_base, rtol=1e-5, atol=1e-5)
    res_sum, _ = eng.score(ids, mask, tm, lora=hook, tail=4, resume=(1, h_base))
    np.testing.assert_allclose(np.asarray(res_sum), np.asarray(full_sum), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"tail must be in \[1, 11\]"):
        eng.score(ids, mask, tm, tail=12)
    # lm-eval's layout (rows hold the input minus its final token, `targets` the next tokens)
    # through the same path: equal sums, and the greedy flag is "every target is the argmax"
    t_sum, t_tok, t_greedy = eng.score(ids[:, :-1], mask[:, :-1], tm[:, 1:], lora=hook, tail=3,
                                       targets=ids[:, 1:], greedy=True)
    np.testing.assert_allclose(np.asarray(t_sum), np.asarray(full_sum), rtol=1e-5, atol=1e-5)
    argmax_ok = np.where(tm[:, 1:], logits[:, :-1].argmax(-1) == ids[:, 1:], True).all(1)
    np.testing.assert_array_equal(np.asarray(t_greedy), argmax_ok)
    ids_g = ids.copy()
    ids_g[:, -3:] = logits[:, -4:-1].argmax(-1)  # greedy continuations: the flag must turn on
    logits_g = np.asarray(eng.forward(ids_g, mask, lora=hook))
    assert (logits_g[:, -4:-1].argmax(-1) == ids_g[:, -3:]).any()
    _, _, g2 = eng.score(ids_g[:, :-1], mask[:, :-1], tm[:, 1:], lora=hook, tail=3,
                         targets=ids_g[:, 1:], greedy=True)
    np.testing.assert_array_equal(
        np.asarray(g2), (logits_g[:, -4:-1].argmax(-1) == ids_g[:, -3:]).all(1))
    with pytest.raises(ValueError, match=r"tail must be in \[1, 11\]"):
        eng.score(ids[:, :-1], mask[:, :-1], tm[:, 1:], tail=12, targets=ids[:, 1:])
    # the pieces compose to __call__
    x = model.embed(jnp.asarray(ids))
    pos = model.positions(jnp.asarray(mask), dtype=x.dtype)
    x, ks, _ = model.run_layers(x, pos, 0, 2, lora=hook)
    x, _, _ = model.run_layers(x, pos, 2, lora=hook)
    assert len(ks) == 2
    np.testing.assert_allclose(np.asarray(model.head(x)), logits, rtol=1e-5, atol=1e-5)


def jax_log_softmax(x):
    import jax

    return jax.nn.log_softmax(jnp.asarray(x, jnp.float32), axis=-1)


def test_gated_hook_sparse_equals_dense():
    """One gated hook: gathering K adapters per row (`idx`) equals the dense `[B, A]` gates with
    the same weights scattered; inactive adapters contribute nothing either way."""
    from hilora_jax.lora.pool import GatedHook

    model = CausalLM(CFG, rngs=None)
    eng = Engine(model)
    pool, _, _ = random_pool(CFG, seed=5)
    a = pool.arrays.num_adapters
    idx = np.array([[2, 0], [a - 1, 1], [1, 1]], np.int32)
    w = np.array([[0.7, 0.3], [1.0, 0.0], [0.5, 0.25]], np.float32)
    dense = np.zeros((3, a), np.float32)
    for b in range(3):
        for k in range(2):
            dense[b, idx[b, k]] += w[b, k]
    ids = np.random.default_rng(2).integers(1, 61, (3, 9)).astype(np.int32)
    sparse = eng.forward(ids, lora=GatedHook(pool.arrays, jnp.asarray(w), idx=jnp.asarray(idx)))
    ref = eng.forward(ids, lora=GatedHook(pool.arrays, jnp.asarray(dense)))
    base = eng.forward(ids)
    np.testing.assert_allclose(np.asarray(sparse), np.asarray(ref), rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(ref) - np.asarray(base)).max() > 1e-3  # the adapters do something
    off = pool.arrays.replace(active=pool.arrays.active.at[2].set(False))
    np.testing.assert_allclose(
        np.asarray(eng.forward(ids, lora=GatedHook(off, jnp.asarray(w), idx=jnp.asarray(idx)))),
        np.asarray(eng.forward(ids, lora=GatedHook(off, jnp.asarray(dense)))), rtol=1e-5, atol=1e-5)
