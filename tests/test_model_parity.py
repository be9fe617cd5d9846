"""Logits and greedy generation equal transformers (fp32) for every supported family/layout."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_utils import hf_logits, make_hf_model, padded_batch

from hilora_jax.inference import Engine
from hilora_jax.io.loading import load_model

TOL = 1e-4


def _check_logits(tmp_path, family, *, lengths=(7, 12, 3), total=12, **cfg):
    hf = make_hf_model(tmp_path, family, **cfg)
    eng = Engine(load_model(tmp_path, progress=False))
    rng = np.random.default_rng(0)
    for side in ("left", "right"):
        ids, mask = padded_batch(rng, lengths, total, side=side)
        ref = hf_logits(hf, ids, mask)
        out = np.asarray(eng.forward(ids, mask))
        valid = mask.astype(bool)
        err = np.abs(out - ref)[valid].max()
        assert err <= TOL, f"{family} {side}-padded: max |diff| = {err}"
    return eng


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("kv_heads,tie", [(6, False), (2, True), (1, False)], ids=["mha", "gqa-tied", "mqa"])
def test_logits_match_transformers(tmp_path, family, kv_heads, tie):
    _check_logits(tmp_path, family, kv_heads=kv_heads, tie=tie)


def test_llama_untied_vs_tied_differ(tmp_path):
    """Guard: tying is actually honoured (a tied model has no lm_head parameter)."""
    make_hf_model(tmp_path / "t", "llama", tie=True)
    make_hf_model(tmp_path / "u", "llama", tie=False)
    assert load_model(tmp_path / "t", progress=False).lm_head is None
    assert load_model(tmp_path / "u", progress=False).lm_head is not None


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 16, "rope_theta": 500000.0},
        {"rope_type": "linear", "factor": 2.5, "rope_theta": 10000.0},
    ],
    ids=["llama3", "linear"],
)
def test_rope_scaling(tmp_path, rope):
    _check_logits(tmp_path, "llama", rope_parameters=rope, lengths=(30, 17), total=30)


def test_rope_scaling_old_layout_is_read(tmp_path):
    """transformers 4.x configs carry `rope_theta` + `rope_scaling` instead of `rope_parameters`."""
    from hilora_jax.model.config import ModelConfig

    cfg = ModelConfig.from_hf_config({
        "model_type": "llama", "vocab_size": 61, "hidden_size": 48, "intermediate_size": 40,
        "num_hidden_layers": 2, "num_attention_heads": 6, "num_key_value_heads": 2,
        "rope_theta": 500000.0, "torch_dtype": "float32",
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    })
    assert cfg.rope.rope_type == "llama3" and cfg.rope.theta == 500000.0 and cfg.rope.factor == 8.0


def test_mistral_sliding_window(tmp_path):
    """A window shorter than the sequence changes results; we implement it rather than refuse."""
    _check_logits(tmp_path, "mistral", sliding_window=5, lengths=(14, 9), total=14)


def test_bf16_close_to_transformers_bf16(tmp_path):
    hf = make_hf_model(tmp_path, "llama")
    eng = Engine(load_model(tmp_path, dtype=jnp.bfloat16, progress=False))
    ids, mask = padded_batch(np.random.default_rng(1), (9, 5), 9, side="right")
    with torch.no_grad():
        ref = hf.to(torch.bfloat16)(input_ids=torch.as_tensor(ids),
                                    attention_mask=torch.as_tensor(mask)).logits.float().numpy()
    out = np.asarray(eng.forward(ids, mask))
    valid = mask.astype(bool)
    # bf16 keeps ~3 significant digits: compare relative to the logit scale, and the argmax.
    assert np.abs(out - ref)[valid].max() <= 0.05 * np.abs(ref[valid]).max()
    assert (out.argmax(-1) == ref.argmax(-1))[valid].mean() >= 0.9
    assert eng.state["model"]["layers"][0]["mlp"]["up_proj"]["kernel"][...].dtype == jnp.bfloat16


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_greedy_generation_matches_transformers(tmp_path, family):
    hf = make_hf_model(tmp_path, family, kv_heads=2, eos_token_id=2)
    eng = Engine(load_model(tmp_path, progress=False))
    rng = np.random.default_rng(3)
    prompts = [list(rng.integers(3, 61, size=n)) for n in (5, 11, 8)]
    ids, mask = padded_batch(rng, [len(p) for p in prompts], 11, side="left")
    for i, p in enumerate(prompts):
        ids[i, 11 - len(p):] = p
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                          max_new_tokens=20, do_sample=False, pad_token_id=0,
                          eos_token_id=[-1]).numpy()[:, 11:]
    out = eng.generate(prompts, max_new_tokens=20, stop_tokens=[-1], pad_id=0)
    np.testing.assert_array_equal(out.tokens, ref)
    assert (out.lengths == 20).all()


def test_generation_stops_and_buckets_do_not_change_results(tmp_path):
    make_hf_model(tmp_path, "llama")
    eng = Engine(load_model(tmp_path, progress=False))
    prompts = [[5, 9, 13, 7], [22, 3]]
    a = eng.generate(prompts, max_new_tokens=12, stop_tokens=[-1])
    b = eng.generate(prompts, max_new_tokens=12, stop_tokens=[-1], prompt_bucket=40)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    # stop on the token generated third by row 0: its length becomes 3, row 1 unaffected unless
    # it produces that token too.
    stop = int(a.tokens[0, 2])
    c = eng.generate(prompts, max_new_tokens=12, stop_tokens=[stop])
    assert c.lengths[0] <= 3 and c.tokens[0, c.lengths[0] - 1] == stop
    assert (c.tokens[0, c.lengths[0]:] == 0).all()


def test_sampling_needs_key_and_is_reproducible(tmp_path):
    import jax

    make_hf_model(tmp_path, "llama")
    eng = Engine(load_model(tmp_path, progress=False))
    with pytest.raises(ValueError, match="PRNG"):
        eng.generate([[4, 5]], temperature=0.8)
    k = jax.random.key(7)
    a = eng.generate([[4, 5], [6]], temperature=1.0, top_p=0.9, key=k, max_new_tokens=10, stop_tokens=[-1])
    b = eng.generate([[4, 5], [6]], temperature=1.0, top_p=0.9, key=k, max_new_tokens=10, stop_tokens=[-1])
    np.testing.assert_array_equal(a.tokens, b.tokens)
    # top_p -> 0 keeps only the argmax: equals greedy
    g = eng.generate([[4, 5], [6]], max_new_tokens=10, stop_tokens=[-1])
    s = eng.generate([[4, 5], [6]], temperature=1.0, top_p=1e-6, key=k, max_new_tokens=10, stop_tokens=[-1])
    np.testing.assert_array_equal(g.tokens, s.tokens)


def test_score_equals_logsoftmax_of_transformers(tmp_path):
    hf = make_hf_model(tmp_path, "qwen2")
    eng = Engine(load_model(tmp_path, progress=False))
    ids, mask = padded_batch(np.random.default_rng(5), (10, 6), 10, side="left")
    target = np.zeros_like(mask)
    target[:, -3:] = 1
    total, per_tok = eng.score(ids, mask, target)
    lp = torch.log_softmax(torch.as_tensor(hf_logits(hf, ids, mask)), -1).numpy()
    ref = np.array([sum(lp[b, t - 1, ids[b, t]] for t in range(7, 10)) for b in range(2)])
    np.testing.assert_allclose(np.asarray(total), ref, atol=1e-4)


@pytest.mark.parametrize("window", [None, 5])
def test_attention_then_write_equals_write_then_attend(window):
    """The decode path (attend over the old cache + the new keys, then write) equals writing the
    new keys first and attending over the updated cache, with left padding, GQA, a write into the
    middle of the cache and a sliding window; the updated caches are identical."""
    import jax
    import jax.numpy as jnp

    from hilora_jax.model import layers

    rng = np.random.default_rng(0)
    b, t, s, n, kh, h, at = 3, 2, 12, 4, 2, 8, 7
    q = jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.float32)
    kc = jnp.asarray(rng.standard_normal((b, s, kh, h)), jnp.float32)
    vc = jnp.asarray(rng.standard_normal((b, s, kh, h)), jnp.float32)
    kn = jnp.asarray(rng.standard_normal((b, t, kh, h)), jnp.float32)
    vn = jnp.asarray(rng.standard_normal((b, t, kh, h)), jnp.float32)
    valid = np.ones((b, s), bool)
    valid[1, :3] = False  # left padding of row 1
    valid[:, at + t:] = False  # not written yet
    pos = np.maximum(np.cumsum(valid, 1) - 1, 0).astype(np.int32)
    q_slot = at + np.arange(t)
    q_pos = pos[:, at:at + t]
    mask = layers.attention_mask(jnp.asarray(q_pos), jnp.asarray(q_slot), jnp.asarray(pos),
                                 jnp.asarray(valid), window)
    out, k2, v2 = jax.jit(layers.attention_then_write)(q, kc, vc, kn, vn, mask, jnp.int32(at))
    k_ref = jax.lax.dynamic_update_slice(kc, kn, (0, at, 0, 0))
    v_ref = jax.lax.dynamic_update_slice(vc, vn, (0, at, 0, 0))
    ref = layers.dot_product_attention(q, k_ref, v_ref, mask)
    np.testing.assert_array_equal(np.asarray(k2), np.asarray(k_ref))
    np.testing.assert_array_equal(np.asarray(v2), np.asarray(v_ref))
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-6, atol=1e-6)
    assert np.abs(np.asarray(ref)).max() > 0.1


def test_decode_attention_orders_generate_the_same(tmp_path):
    """The TPU decode order (attend over the old cache + the new token, then write) and the
    write-first order give the same decode logits and greedy tokens through `Engine.generate`,
    on a left-padded batch (GQA, sliding window)."""
    from hilora_jax.inference import pad_batch
    from hilora_jax.model import llama

    make_hf_model(tmp_path, "mistral", kv_heads=2)
    model = load_model(tmp_path, progress=False)
    prompts = [[5, 9, 13, 2, 7, 30, 11], [4, 8], [17, 3, 3, 21]]
    out, logits = {}, {}
    for mode in ("then_write", "write_first"):
        with llama.decode_attention(mode):
            eng = Engine(model)
            out[mode] = eng.generate(prompts, max_new_tokens=12, stop_tokens=[-1]).tokens
            lg, cache = eng.prefill(*pad_batch(prompts, 8, 0), cache_size=32)
            lg, _ = eng.decode_step(np.asarray(lg).argmax(-1), cache)
            logits[mode] = np.asarray(lg)
    np.testing.assert_array_equal(out["then_write"], out["write_first"])
    np.testing.assert_allclose(logits["then_write"], logits["write_first"], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="DECODE_ATTENTION"), llama.decode_attention("later"):
        Engine(model).generate(prompts, max_new_tokens=2)
