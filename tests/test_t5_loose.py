"""Loose ends of the T5 work (issue 16): generation with any number of stop tokens equals
transformers and reuses the compiled decode loop (Llama `Engine` and `T5Engine`, one shared
`inference.stop_id_array`); `t5.config.is_t5_dir`; `viz` plots a T5 routing trace (rows per
encoder and decoder block, counts equal to the trace's over each sequence's own mask);
`lora.train.trainable_from_peft` on T5 (per-stack depths) and Llama adapters == PEFT."""

import zlib

import numpy as np
import pytest
import torch
import transformers as tf
from hf_utils import make_hf_model
from t5_utils import VOCAB, make_hf_t5, padded
from t5_utils import hf_logits as hf_t5_logits

from hilora_jax import viz
from hilora_jax.embed import PrecomputedEmbedder
from hilora_jax.inference import Engine
from hilora_jax.io.loading import load_model
from hilora_jax.lora import load_pool
from hilora_jax.routing import build_router
from hilora_jax.t5.config import is_t5_dir
from hilora_jax.t5.generate import T5Engine
from hilora_jax.t5.load import load_t5

MAX_NEW = 12


def _stops_from(tokens) -> tuple[list[int], list[int]]:
    """One stop id (row 0's third token) and three (plus tokens of rows 1 and 2), taken from a
    run without stops so every row really stops somewhere."""
    one = [int(tokens[0, 2])]
    return one, one + [int(tokens[1, 4]), int(tokens[2, 1])]


def _pad_to(ref: np.ndarray, n: int) -> np.ndarray:
    return np.pad(ref, ((0, 0), (0, n - ref.shape[1])))  # HF stops once every row did


def test_llama_generate_stop_counts_match_transformers_without_recompiling(tmp_path):
    hf = make_hf_model(tmp_path, "llama", eos_token_id=2)
    eng = Engine(load_model(tmp_path, progress=False))
    prompts = [[5, 9, 13, 7, 30], [22, 3], [40, 41, 8]]
    t = 16
    ids = np.zeros((3, t), np.int64)
    mask = np.zeros((3, t), np.int64)
    for i, p in enumerate(prompts):
        ids[i, t - len(p):], mask[i, t - len(p):] = p, 1

    def ref(stops):
        with torch.no_grad():
            out = hf.generate(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                              max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=0,
                              eos_token_id=stops).numpy()[:, t:]
        return _pad_to(out, MAX_NEW)

    free = eng.generate(prompts, max_new_tokens=MAX_NEW, stop_tokens=[-1])
    np.testing.assert_array_equal(free.tokens, ref([-1]))
    one, three = _stops_from(free.tokens)
    n_compiled = eng._generate._cache_size()
    for stops in (one, three):
        out = eng.generate(prompts, max_new_tokens=MAX_NEW, stop_tokens=stops)
        np.testing.assert_array_equal(out.tokens, ref(stops))
        assert (out.lengths < MAX_NEW).any()  # the stops really ended rows
    assert eng._generate._cache_size() == n_compiled  # 1, 1 and 3 stop ids: one compiled loop


def test_t5_generate_stop_counts_match_transformers_without_recompiling(tmp_path):
    hf = make_hf_t5(tmp_path, "v1.1")
    eng = T5Engine(load_t5(tmp_path))
    lengths = (9, 5, 7)
    ids, mask = padded(np.random.default_rng(2), lengths, 9)
    prompts = [list(ids[i, :n]) for i, n in enumerate(lengths)]

    def ref(stops):
        hf.generation_config.eos_token_id = stops
        with torch.no_grad():  # use_cache=False: see test_t5._hf_greedy
            out = hf.generate(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                              max_new_tokens=MAX_NEW, min_new_tokens=0, do_sample=False,
                              num_beams=1, use_cache=False).numpy()[:, 1:]
        return _pad_to(out, MAX_NEW)

    free = eng.generate(prompts, max_new_tokens=MAX_NEW, stop_tokens=[VOCAB + 5])
    np.testing.assert_array_equal(free.tokens, ref(None))
    one, three = _stops_from(free.tokens)
    n_compiled = eng._generate._cache_size()
    for stops in (one, three):
        out = eng.generate(prompts, max_new_tokens=MAX_NEW, stop_tokens=stops)
        np.testing.assert_array_equal(out.tokens, ref(stops))
        assert (out.lengths < MAX_NEW).any()
    assert eng._generate._cache_size() == n_compiled


def test_is_t5_dir(tmp_path):
    """`t5.config.is_t5_dir` (the CLI's, the trainer's and lm-eval's T5 switch): only a directory
    whose config.json says `model_type: t5`."""
    cases = {"t5": '{"model_type": "t5"}', "llama": '{"model_type": "llama"}',
             "bad_json": "{model_type: t5", "list": '["t5"]'}
    for name, text in cases.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(text)
    assert is_t5_dir(tmp_path / "t5") and is_t5_dir(str(tmp_path / "t5"))
    for name in ("llama", "bad_json", "list", "missing"):
        assert not is_t5_dir(tmp_path / name), name
    assert not is_t5_dir("google/flan-t5-small")  # a hub id is not a local T5 directory


# -- viz on a T5 routing trace --------------------------------------------------------------------
EMB_DIM = 4
ADAPTERS = {"a0": dict(r=4, lora_alpha=8, target_modules=["q", "v"]),
            "a1": dict(r=2, lora_alpha=4, target_modules=["k", "o", "wo"],
                       layers_to_transform=[0, 2])}
TEXTS = ["task0 q1", "task1 q0", "task1 q3"]


def _embed(text):
    """`task{i} ...` near a per-task mean (deterministic)."""
    rng = np.random.default_rng(zlib.crc32(text.encode()))
    return np.eye(EMB_DIM)[int(text.split()[0][4:])] * 8.0 + rng.standard_normal(EMB_DIM)


@pytest.fixture(scope="module")
def t5_adapters(tmp_path_factory):
    """A tiny T5 v1.1 (2 encoder, 3 decoder blocks), two PEFT adapters over both stacks (`a1` on
    blocks 0 and 2 only), the loaded model and pool."""
    from peft import LoraConfig, get_peft_model

    d = tmp_path_factory.mktemp("t5loose")
    make_hf_t5(d / "base", "v1.1")
    dirs = {}
    for i, (name, kw) in enumerate(ADAPTERS.items()):
        torch.manual_seed(i + 1)
        base = tf.T5ForConditionalGeneration.from_pretrained(str(d / "base")).eval()
        pm = get_peft_model(base, LoraConfig(task_type="SEQ_2_SEQ_LM", init_lora_weights=False,
                                             **kw))
        pm.save_pretrained(str(d / name))
        dirs[name] = str(d / name)
    model = load_t5(d / "base")
    manifest = {"adapters": {n: {"path": p, "samples": [f"task{i} s{j}" for j in range(8)]}
                             for i, (n, p) in enumerate(dirs.items())}}
    return d, dirs, model, load_pool(manifest, model=model, progress=False)


@pytest.fixture(scope="module")
def t5_trace(t5_adapters):
    _, _, model, pool = t5_adapters
    routing = build_router("hilora", pool, options=dict(
        embedder=PrecomputedEmbedder(_embed, dim=EMB_DIM), k=2, gamma=0.5)).route(TEXTS)
    rng = np.random.default_rng(0)
    ids, mask = padded(rng, (9, 4, 6), 9)  # encoder 9 tokens, decoder 5: padding in both
    dids, dmask = padded(rng, (5, 2, 4), 5)
    _, trace = T5Engine(model).forward(ids, mask, dids, dmask, lora=routing.hook, trace=True)
    return model.config, routing, trace


def test_viz_plots_a_t5_trace(t5_trace, tmp_path):
    """`viz.trace_usage` / `plot_routing` on a `T5Engine.forward` HiLoRA trace: one row per
    encoder block then per decoder block, modules shared by both stacks; every cell equals the
    trace's ROCs fired per real token of its own sequence (encoder mask for encoder rows and
    cross-attention k/v, decoder mask otherwise), scattered onto the pool's LoRAs; the PNG is
    written."""
    cfg, routing, trace = t5_trace
    layers, mods, per_mod, per_lora, unit = viz.trace_usage(routing, trace)
    assert layers == ([("encoder", b) for b in range(cfg.num_layers)]
                      + [("decoder", b) for b in range(cfg.num_decoder_layers)])
    assert mods == ["SelfAttention.q", "SelfAttention.k", "SelfAttention.v", "SelfAttention.o",
                    "EncDecAttention.q", "EncDecAttention.k", "EncDecAttention.v",
                    "EncDecAttention.o", "DenseReluDense.wo"]
    assert unit == "ROCs fired per token"
    idx, valid = routing.info["cand_idx"], routing.info["cand_valid"]
    want_mod = np.full(per_mod.shape, np.nan)
    want_lora = np.zeros(per_lora.shape)
    for key, aux in trace.items():
        if key.endswith("attention_mask"):
            continue
        block, stack, module = key.split(".", 2)
        enc = stack == "encoder" or module in ("EncDecAttention.k", "EncDecAttention.v")
        m = trace["attention_mask" if enc else "decoder_attention_mask"].astype(np.float64)
        fired = np.asarray(aux["fired"], np.float64)  # B T C
        assert fired.shape[:2] == m.shape, key
        li = layers.index((stack, int(block)))
        per_cand = (fired * m[:, :, None]).sum(1) / m.sum()  # B C
        want_mod[li, mods.index(module)] = (per_cand * valid[:, :per_cand.shape[1]]).sum()
        for b in range(per_cand.shape[0]):
            for c in range(per_cand.shape[1]):
                want_lora[li, idx[b, c]] += per_cand[b, c] * valid[b, c]
    np.testing.assert_allclose(per_mod, want_mod, rtol=1e-12, equal_nan=True)
    np.testing.assert_allclose(per_lora, want_lora, rtol=1e-12)
    assert np.isnan(per_mod[0, mods.index("EncDecAttention.q")])  # no cross-attention in encoder
    assert np.nansum(per_mod) > 0 and per_lora[:, 0].sum() > 0 and per_lora[:, 1].sum() > 0
    out = tmp_path / "t5_routing.png"
    fig = viz.plot_routing(routing, trace, prompts=TEXTS, save=out)
    assert out.stat().st_size > 1000 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    heat = [a for a in fig.axes if a.images]
    assert len(heat) == 2
    labels = [t.get_text() for t in heat[0].get_yticklabels()]
    assert labels == [f"encoder {b}" for b in range(cfg.num_layers)] + [
        f"decoder {b}" for b in range(cfg.num_decoder_layers)]
    np.testing.assert_allclose(heat[0].images[0].get_array(), per_mod, equal_nan=True)


# -- trainable_from_peft -------------------------------------------------------------------------
def test_trainable_from_peft_t5_adapter_equals_peft(t5_adapters):
    """A read T5 PEFT adapter (the pool reader's `PeftAdapter`) as the trainer's hook: every row as deep as its own stack (encoder 2,
    decoder 3 blocks), and `T5Engine.forward` with it == `PeftModel` logits (fp32); one layer count
    for a T5 adapter is refused."""
    from peft import PeftModel

    from hilora_jax.lora.train import trainable_from_peft
    from hilora_jax.t5.lora import read_t5_pool_adapter

    d, dirs, model, _ = t5_adapters
    cfg = model.config
    rng = np.random.default_rng(4)
    ids, mask = padded(rng, (8, 3, 6), 8)
    dids, dmask = padded(rng, (5, 2, 4), 5)
    base = tf.T5ForConditionalGeneration.from_pretrained(str(d / "base")).eval()
    plain = hf_t5_logits(base, ids, mask, dids, dmask)
    for name, path in dirs.items():
        adapter = read_t5_pool_adapter(path, cfg)
        hook = trainable_from_peft(adapter, cfg)
        for mod, a in hook.a.items():
            depth = cfg.num_layers if mod.startswith("encoder.") else cfg.num_decoder_layers
            assert a.shape[0] == hook.b[mod].shape[0] == depth, mod
        assert hook.layers is None
        assert any(m.startswith("decoder.") for m in hook.a)
        base = tf.T5ForConditionalGeneration.from_pretrained(str(d / "base")).eval()
        want = hf_t5_logits(PeftModel.from_pretrained(base, path).eval(), ids, mask, dids, dmask)
        got = np.asarray(T5Engine(model).forward(ids, mask, dids, dmask, lora=hook))
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4, err_msg=name)
        assert np.abs(want - plain).max() > 1e-2, name  # the adapter changes the logits
        with pytest.raises(ValueError, match="T5 adapter needs the T5 config"):
            trainable_from_peft(adapter, cfg.num_layers)


def test_trainable_from_peft_llama_layer_subset(tmp_path):
    """A Llama adapter on layer 1 of 2 (`layers_to_transform`): the same hook from the layer count
    and from the config, restricted to layer 1, and its logits == `PeftModel`'s."""
    from peft_utils import make_peft_adapter, peft_model

    from hilora_jax.io.peft import read_adapter
    from hilora_jax.lora.train import trainable_from_peft

    make_hf_model(tmp_path / "base", "llama")
    path = make_peft_adapter(tmp_path / "base", tmp_path / "ad", r=4, lora_alpha=8,
                             target_modules=["q_proj", "down_proj"], layers_to_transform=[1])
    model = load_model(tmp_path / "base", progress=False)
    adapter = read_adapter(path, model.config)
    by_int = trainable_from_peft(adapter, model.config.num_layers)
    hook = trainable_from_peft(adapter, model.config)
    assert hook.layers == by_int.layers == (1,)
    for mod in ("q_proj", "down_proj"):
        np.testing.assert_array_equal(hook.a[mod], by_int.a[mod])
        assert hook.a[mod].shape[0] == model.config.num_layers and not hook.a[mod][0].any()
    ids = np.random.default_rng(0).integers(3, 60, size=(2, 7))
    mask = np.ones_like(ids)
    with torch.no_grad():
        want = peft_model(tmp_path / "base", path)(input_ids=torch.as_tensor(ids),
                                                   attention_mask=torch.as_tensor(mask)).logits
    got = np.asarray(Engine(model).forward(ids, mask, lora=hook))
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=1e-4)
