"""T5 / FLAN-T5: strict config reading, loading, and fp32 parity with transformers'
`T5ForConditionalGeneration` (logits, cached greedy generation, choice scoring, sharding)."""

import json
import re
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from t5_utils import VOCAB, hf_logits, make_hf_t5, padded
from transformers.models.t5.modeling_t5 import T5Attention

from hilora_jax.io.safetensors import CheckpointError, SafetensorsFile, save_file
from hilora_jax.model import sharding as shd
from hilora_jax.model.config import UnknownFieldWarning, UnsupportedConfigError
from hilora_jax.t5.config import T5Config
from hilora_jax.t5.generate import T5Engine
from hilora_jax.t5.load import load_t5
from hilora_jax.t5.model import bucket_table
from hilora_jax.t5.projections import module_shapes, projections

TOL = 1e-4
PUBLISHED = Path(__file__).parent / "data" / "published" / "t5"


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


# -- config ------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", sorted(PUBLISHED.glob("*.json")), ids=lambda p: p.stem)
def test_published_configs_load(path):
    raw = json.loads(path.read_text())
    cfg = T5Config.from_hf_config(path)
    assert (cfg.d_model, cfg.d_ff, cfg.num_heads, cfg.d_kv) == (
        raw["d_model"], raw["d_ff"], raw["num_heads"], raw["d_kv"])
    assert cfg.num_decoder_layers == raw.get("num_decoder_layers", raw["num_layers"])
    if path.stem.startswith("flan"):  # v1.1 layout
        assert cfg.is_gated_act and cfg.dense_act_fn == "gelu_new"
        assert not cfg.tie_word_embeddings and not cfg.scale_decoder_outputs
    else:  # T5 v1.0
        assert not cfg.is_gated_act and cfg.dense_act_fn == "relu"
        assert cfg.tie_word_embeddings and cfg.scale_decoder_outputs
    assert path.name in re.findall(r"`([\w.-]+\.json)`", (PUBLISHED / "SOURCES.md").read_text())


@pytest.mark.parametrize("path", sorted(PUBLISHED.glob("*.json")), ids=lambda p: p.stem)
def test_published_configs_build_transformers_shapes(path):
    """At full size (shapes only: our abstract model, transformers on the meta device), every
    transformers tensor maps through the loader's table onto a parameter of the same shape."""
    import transformers as tf

    from hilora_jax.t5.load import _T, EMBED_ALIASES, abstract_model, map_key

    cfg = T5Config.from_hf_config(path)
    _, _, flat = abstract_model(cfg)
    with torch.device("meta"):
        hf = tf.T5ForConditionalGeneration(tf.T5Config.from_dict(json.loads(path.read_text())))
    seen = set()
    for key, t in hf.state_dict().items():
        if key in EMBED_ALIASES or (key == "lm_head.weight" and cfg.tie_word_embeddings):
            continue
        target, fn = map_key(key)
        want = tuple(t.shape[::-1]) if fn is _T else tuple(t.shape)
        assert tuple(flat[target].shape) == want, key
        seen.add(target)
    assert seen == set(flat)


BASE = {"model_type": "t5", "vocab_size": 10, "d_model": 8, "d_kv": 3, "d_ff": 12, "num_layers": 1,
        "num_heads": 2}


def test_config_layouts_4x_and_5x():
    # 4.x: scaling follows tie_word_embeddings (default true)
    assert T5Config.from_hf_config(BASE).scale_decoder_outputs
    c = T5Config.from_hf_config({**BASE, "tie_word_embeddings": False,
                                 "feed_forward_proj": "gated-gelu"})
    assert not c.scale_decoder_outputs and not c.tie_word_embeddings and c.is_gated_act
    # 5.x: scale_decoder_outputs is stored, tie_word_embeddings is always true
    c = T5Config.from_hf_config({**BASE, "tie_word_embeddings": True, "scale_decoder_outputs": False})
    assert not c.scale_decoder_outputs and c.tie_word_embeddings
    # stored dense_act_fn / is_gated_act win over feed_forward_proj, as in transformers
    c = T5Config.from_hf_config({**BASE, "feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu"})
    assert (c.dense_act_fn, c.is_gated_act) == ("gelu", True)
    assert T5Config.from_hf_config({**BASE, "feed_forward_proj": "gelu"}).dense_act_fn == "gelu"
    assert T5Config.from_hf_config(BASE).num_decoder_layers == 1  # defaults to num_layers


@pytest.mark.parametrize("extra,field", [
    ({"feed_forward_proj": "gated-swiglu"}, "feed_forward_proj"),
    ({"feed_forward_proj": "gelu-gated"}, "feed_forward_proj"),
    ({"feed_forward_proj": "gated-gelu", "dense_act_fn": "tanh"}, "dense_act_fn"),
    ({"model_type": "mt5"}, "model_type"),
    ({"model_type": "llama"}, "model_type"),
    ({"architectures": ["T5EncoderModel"]}, "architectures"),
    ({"is_encoder_decoder": False}, "is_encoder_decoder"),
    ({"rope_theta": 10000.0}, "rope_theta"),
    ({"quantization_config": {"bits": 4}}, "quantization_config"),
    ({"num_heads": 0}, "num_heads"),
    ({"d_ff": None, "d_model": 8}, "d_ff"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_unsupported_config_is_one_line_naming_the_field(extra, field):
    cfg = {**BASE, **extra}
    if cfg.get("d_ff") is None:
        cfg.pop("d_ff")
    with pytest.raises(UnsupportedConfigError) as e:
        T5Config.from_hf_config(cfg, source="cfg.json")
    msg = _one_line(e)
    assert msg.startswith("cfg.json: ") and repr(field) in msg, msg


def test_unset_unknown_field_warns_once():
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        T5Config.from_hf_config({**BASE, "some_new_flag": None, "other": False})
    hits = [x for x in w if issubclass(x.category, UnknownFieldWarning)]
    assert len(hits) == 1 and "some_new_flag" in str(hits[0].message)


def test_bucket_table_equals_transformers():
    """Bucket table (NumPy float32) == torch's bucket arithmetic, incl. the integer boundaries."""
    span = 700
    rel = torch.arange(-(span - 1), span)
    for buckets, dist in ((32, 128), (12, 24), (16, 20), (7, 37)):
        for bidi in (True, False):
            ref = T5Attention._relative_position_bucket(rel, bidirectional=bidi,
                                                        num_buckets=buckets, max_distance=dist)
            np.testing.assert_array_equal(bucket_table(span, bidi, buckets, dist), ref.numpy())


# -- parity ------------------------------------------------------------------------------------
def _logits_check(hf, eng, seed=0):
    rng = np.random.default_rng(seed)
    worst = 0.0
    for side in ("right", "left"):
        ids, mask = padded(rng, (30, 11, 23), 30, side=side)  # > max_distance: log buckets used
        dids, dmask = padded(rng, (9, 4, 7), 9, side="right")
        dids[:, 0] = 0  # decoder start
        ref = hf_logits(hf, ids, mask, dids, dmask)
        out = np.asarray(eng.forward(ids, mask, dids, dmask))
        err = np.abs(out - ref)[dmask.astype(bool)].max()
        assert err <= TOL, f"{side}-padded encoder: max |diff| = {err}"
        worst = max(worst, err)
    return worst


@pytest.mark.parametrize("variant,layout", [("v1.0", "4.x"), ("v1.1", "4.x"), ("v1.1", "5.x")])
def test_logits_match_transformers(tmp_path, variant, layout):
    hf = make_hf_t5(tmp_path, variant, layout=layout)
    model = load_t5(tmp_path)
    assert (model.lm_head is None) == (variant == "v1.0")  # v1.1 head untied, in both layouts
    assert model.config.scale_decoder_outputs == (variant == "v1.0")
    eng = T5Engine(model)
    _logits_check(hf, eng)
    ids, mask = padded(np.random.default_rng(9), (10, 3), 10, side="left")
    with torch.no_grad():
        enc_ref = hf.encoder(input_ids=torch.as_tensor(ids),
                             attention_mask=torch.as_tensor(mask)).last_hidden_state.numpy()
    enc = np.asarray(eng.encode(ids, mask))
    assert np.abs(enc - enc_ref)[mask.astype(bool)].max() <= TOL


def _hf_greedy(hf, ids, mask, n):
    # use_cache=False: transformers 5.24 sizes T5's decoder cache by num_layers (the encoder's
    # count) and fails when num_decoder_layers is larger; recomputing every step is also a
    # reference independent of any cache
    with torch.no_grad():
        out = hf.generate(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                          max_new_tokens=n, min_new_tokens=0, do_sample=False, num_beams=1,
                          use_cache=False)
    return out.numpy()[:, 1:]  # drop the decoder start token


@pytest.mark.parametrize("variant", ["v1.0", "v1.1"])
def test_greedy_generation_matches_transformers(tmp_path, variant):
    hf = make_hf_t5(tmp_path, variant)
    eng = T5Engine(load_t5(tmp_path))
    rng = np.random.default_rng(1)
    lengths = (13, 5, 9, 2)
    ids, mask = padded(rng, lengths, 13)
    prompts = [list(ids[i, :n]) for i, n in enumerate(lengths)]
    # stop on a token id outside the vocabulary: all 20 tokens are produced and compared
    hf.generation_config.eos_token_id = None
    ref = _hf_greedy(hf, ids, mask, 20)
    out = eng.generate(prompts, max_new_tokens=20, stop_tokens=[VOCAB + 5])
    assert ref.shape == (4, 20)
    np.testing.assert_array_equal(out.tokens, ref)
    assert (out.lengths == 20).all()
    assert len(set(ref.ravel().tolist())) > 5  # not a degenerate constant output
    # with the real stop token (eos = 1): HF stops that row and pads; so must we
    hf.generation_config.eos_token_id = 1
    ref_eos = _hf_greedy(hf, ids, mask, 20)
    out_eos = eng.generate(prompts, max_new_tokens=20)
    ref_eos = np.pad(ref_eos, ((0, 0), (0, 20 - ref_eos.shape[1])))  # HF stops when all rows did
    np.testing.assert_array_equal(out_eos.tokens, ref_eos)


def test_stop_tokens_and_seeded_sampling(tmp_path):
    make_hf_t5(tmp_path, "v1.1")
    eng = T5Engine(load_t5(tmp_path))
    prompts = [[5, 9, 11, 3], [7, 8]]
    greedy = eng.generate(prompts, max_new_tokens=12, stop_tokens=[VOCAB + 5]).tokens
    stop = int(greedy[0, 3])  # stop on row 0's 4th token: row 0 ends there (first occurrence)
    first = int(np.argmax(greedy[0] == stop))
    out = eng.generate(prompts, max_new_tokens=12, stop_tokens=[stop])
    assert out.lengths[0] == first + 1
    np.testing.assert_array_equal(out.tokens[0, : first + 1], greedy[0, : first + 1])
    assert (out.tokens[0, first + 1:] == 0).all()
    k = jax.random.key(7)
    a = eng.generate(prompts, max_new_tokens=12, temperature=1.5, key=k, stop_tokens=[VOCAB + 5])
    b = eng.generate(prompts, max_new_tokens=12, temperature=1.5, key=k, stop_tokens=[VOCAB + 5])
    c = eng.generate(prompts, max_new_tokens=12, temperature=1.5, key=jax.random.key(8),
                     stop_tokens=[VOCAB + 5])
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)
    assert not np.array_equal(a.tokens, greedy)
    assert ((a.tokens >= 0) & (a.tokens < VOCAB)).all()
    with pytest.raises(ValueError, match="PRNG"):
        eng.generate(prompts, temperature=1.0)


@pytest.mark.parametrize("variant", ["v1.0", "v1.1"])
def test_choice_scores_equal_transformers_loss(tmp_path, variant):
    hf = make_hf_t5(tmp_path, variant)
    eng = T5Engine(load_t5(tmp_path))
    prompts = [[4, 9, 22, 31, 7, 1], [12, 5, 1]]
    choices = [[[8, 3, 1], [40, 1], [8, 3, 17, 20, 1]], [[6, 1], [50, 51, 52, 1], [9, 1]]]
    got = eng.score_choices(prompts, choices)
    assert got.shape == (2, 3)
    for i, p in enumerate(prompts):
        for j, ch in enumerate(choices[i]):
            with torch.no_grad():
                loss = hf(input_ids=torch.tensor([p]), labels=torch.tensor([ch])).loss.item()
            assert abs(got[i, j] - (-loss * len(ch))) <= TOL * len(ch), (i, j)


def test_sharded_equals_unsharded(tmp_path):
    hf = make_hf_t5(tmp_path, "v1.1")
    mesh = shd.make_mesh(data=2, model=4)
    sharded = load_t5(tmp_path, mesh=mesh)
    # the rules table is applied: q heads (inner 35 -> not divisible by 4: replicated), d_ff=52
    # over model, vocab 67 not divisible -> replicated; the encoder wi_0 is split 4 ways
    wi = sharded.encoder.block[0].layer[1].DenseReluDense.wi_0.kernel[...]
    assert wi.sharding.spec == jax.sharding.PartitionSpec(None, "model")
    assert len({str(s.index) for s in wi.addressable_shards}) == 4
    plain, eng_s = T5Engine(load_t5(tmp_path)), T5Engine(sharded, mesh=mesh)
    rng = np.random.default_rng(3)
    ids, mask = padded(rng, (17, 6), 17)
    dids, dmask = padded(rng, (5, 3), 5)
    a = np.asarray(plain.forward(ids, mask, dids, dmask))
    b = np.asarray(eng_s.forward(ids, mask, dids, dmask))
    np.testing.assert_allclose(a, b, atol=1e-5)
    ref = hf_logits(hf, ids, mask, dids, dmask)
    assert np.abs(b - ref)[dmask.astype(bool)].max() <= TOL
    prompts = [list(ids[0, :17]), list(ids[1, :6])]
    np.testing.assert_array_equal(plain.generate(prompts, max_new_tokens=10).tokens,
                                  eng_s.generate(prompts, max_new_tokens=10).tokens)


def test_bf16_as_close_to_fp32_as_transformers_bf16(tmp_path):
    """bf16 weights and activations (wo kept in float32): the error against the fp32 reference
    is of the size transformers' own bf16 model has on the same (deliberately sensitive) model."""
    hf = make_hf_t5(tmp_path, "v1.1")
    m16 = load_t5(tmp_path, dtype=jnp.bfloat16)
    assert m16.shared.embedding[...].dtype == jnp.bfloat16
    assert m16.decoder.block[0].layer[2].DenseReluDense.wo.kernel[...].dtype == jnp.float32
    rng = np.random.default_rng(4)
    ids, mask = padded(rng, (12, 7), 12)
    dids, dmask = padded(rng, (6, 6), 6)
    ref = hf_logits(hf, ids, mask, dids, dmask)
    with torch.no_grad():
        hb = hf.to(torch.bfloat16)(input_ids=torch.as_tensor(ids),
                                   attention_mask=torch.as_tensor(mask),
                                   decoder_input_ids=torch.as_tensor(dids),
                                   decoder_attention_mask=torch.as_tensor(dmask))
    err_hf = np.abs(hb.logits.float().numpy() - ref).max()
    err = np.abs(np.asarray(T5Engine(m16).forward(ids, mask, dids, dmask)) - ref).max()
    assert 0 < err <= 1.5 * err_hf + 1e-2, (err, err_hf)


# -- loading -----------------------------------------------------------------------------------
def _flat_params(model):
    from flax import nnx

    return {".".join(map(str, k)): np.asarray(v.get_value())
            for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_sharded_safetensors_and_pytorch_bin(tmp_path):
    hf = make_hf_t5(tmp_path / "one", "v1.1")
    cfg_text = (tmp_path / "one" / "config.json").read_text()
    hf.save_pretrained(str(tmp_path / "shards"), max_shard_size="20KB")
    assert len(json.loads((tmp_path / "shards" / "model.safetensors.index.json").read_text())
               ["weight_map"]) > 10
    (tmp_path / "shards" / "config.json").write_text(cfg_text)
    sd = hf.state_dict()  # includes the encoder/decoder embed_tokens copies of `shared`
    (tmp_path / "bin").mkdir()
    torch.save(sd, tmp_path / "bin" / "pytorch_model.bin")
    (tmp_path / "bin" / "config.json").write_text(cfg_text)
    # sharded pytorch_model.bin with its index, half of the tensors in bf16
    d = tmp_path / "binshards"
    d.mkdir()
    keys = sorted(sd)
    parts = {"pytorch_model-00001-of-00002.bin": keys[::2], "pytorch_model-00002-of-00002.bin": keys[1::2]}
    for fname, ks in parts.items():
        half = fname.startswith("pytorch_model-00002")  # (the tied embedding copies stay fp32)
        torch.save({k: sd[k].to(torch.bfloat16) if half and "embed" not in k and k != "shared.weight"
                    else sd[k] for k in ks}, d / fname)
    (d / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, ks in parts.items() for k in ks}}))
    (d / "config.json").write_text(cfg_text)
    want = _flat_params(load_t5(tmp_path / "one"))
    assert "lm_head.kernel" in want and len(want) > 40
    for name in ("shards", "bin"):
        got = _flat_params(load_t5(tmp_path / name))
        assert got.keys() == want.keys()
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"{name}: {k}")
    got = _flat_params(load_t5(d))
    for k in want:  # the bf16 half is rounded; the rest is exact
        np.testing.assert_allclose(got[k], want[k], rtol=1e-2, atol=1e-6, err_msg=k)
    assert sum(np.array_equal(got[k], want[k]) for k in want) >= len(want) // 3


def _rewrite(src: Path, dst: Path, edit):
    dst.mkdir()
    st = SafetensorsFile(src / "model.safetensors")
    tensors = {k: st[k] for k in st}
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    (dst / "config.json").write_text((src / "config.json").read_text())


def test_missing_cross_attention_tensor_is_one_line(tmp_path):
    make_hf_t5(tmp_path / "ok", "v1.1")
    key = "decoder.block.1.layer.1.EncDecAttention.k.weight"
    _rewrite(tmp_path / "ok", tmp_path / "bad", lambda t: t.pop(key))
    with pytest.raises(CheckpointError) as e:
        load_t5(tmp_path / "bad")
    msg = _one_line(e)
    assert f"missing tensor {key!r}" in msg and "1 problem(s)" in msg


def test_untied_head_missing_and_bad_shapes(tmp_path):
    make_hf_t5(tmp_path / "ok", "v1.1")  # 4.x layout: tie_word_embeddings=false
    _rewrite(tmp_path / "ok", tmp_path / "nohead", lambda t: t.pop("lm_head.weight"))
    with pytest.raises(CheckpointError) as e:
        load_t5(tmp_path / "nohead")
    assert "'lm_head.weight'" in _one_line(e)

    def edit(t):
        t["decoder.block.0.layer.2.DenseReluDense.wo.weight"] = np.zeros((40, 51), np.float32)
        t["decoder.block.9.layer.0.SelfAttention.q.weight"] = np.zeros((35, 40), np.float32)
    _rewrite(tmp_path / "ok", tmp_path / "shape", edit)
    with pytest.raises(CheckpointError) as e:
        load_t5(tmp_path / "shape")
    msg = _one_line(e)
    assert "DenseReluDense.wo.weight" in msg and "(40, 51)" in msg and "block.9" in msg


def test_tied_head_copy_in_checkpoint_stays_tied(tmp_path):
    """A 5.x-layout v1.0 checkpoint that also stores lm_head = shared keeps a tied head."""
    make_hf_t5(tmp_path / "ok", "v1.0", layout="5.x")
    _rewrite(tmp_path / "ok", tmp_path / "copy",
             lambda t: t.__setitem__("lm_head.weight", t["shared.weight"].copy()))
    assert load_t5(tmp_path / "copy").lm_head is None


def test_bin_without_torch_is_one_line(tmp_path, monkeypatch):
    hf = make_hf_t5(tmp_path / "ok", "v1.0")
    (tmp_path / "bin").mkdir()
    torch.save(hf.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "ok" / "config.json").read_text())
    import builtins

    real = builtins.__import__

    def no_torch(name, *a, **k):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("No module named 'torch'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    with pytest.raises(CheckpointError) as e:
        load_t5(tmp_path / "bin")
    assert "needs torch" in _one_line(e)


def test_projection_table_matches_hf_modules(tmp_path):
    for variant in ("v1.0", "v1.1"):
        hf = make_hf_t5(tmp_path / variant, variant)
        cfg = load_t5(tmp_path / variant).config
        linear = {n: (m.in_features, m.out_features) for n, m in hf.named_modules()
                  if isinstance(m, torch.nn.Linear) and n != "lm_head"}
        assert module_shapes(cfg) == linear
        assert {p.target for p in projections(cfg)} == (
            {"q", "k", "v", "o", "wi_0", "wi_1", "wo"} if variant == "v1.1"
            else {"q", "k", "v", "o", "wi", "wo"})


# -- PEFT LoRA adapters --------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["v1.0", "v1.1"])
def test_peft_t5_adapter_matches_peftmodel(tmp_path, variant):
    """All T5 targets (q,k,v,o in encoder self-attention, decoder self-attention and
    EncDecAttention; wi / wi_0 / wi_1 / wo), rank and alpha patterns, layers_to_transform."""
    from peft import LoraConfig, get_peft_model

    from hilora_jax.t5.lora import SingleLoraHook, read_t5_adapter

    hf = make_hf_t5(tmp_path / "base", variant)
    rng = np.random.default_rng(6)
    ids, mask = padded(rng, (14, 6), 14)
    dids, dmask = padded(rng, (7, 4), 7)
    base_ref = hf_logits(hf, ids, mask, dids, dmask)
    torch.manual_seed(1)
    lcfg = LoraConfig(task_type="SEQ_2_SEQ_LM", r=4, lora_alpha=8, init_lora_weights=False,
                      target_modules=["q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo"],
                      rank_pattern={"wo": 2}, alpha_pattern={"EncDecAttention.q": 3.0},
                      layers_to_transform=[0, 2])
    pm = get_peft_model(hf, lcfg).eval()
    ref = hf_logits(pm, ids, mask, dids, dmask)
    assert np.abs(ref - base_ref)[dmask.astype(bool)].max() > 1e-2  # the adapter matters
    pm.save_pretrained(str(tmp_path / "ad"))
    model = load_t5(tmp_path / "base")
    ad = read_t5_adapter(tmp_path / "ad", model.config)
    ffn = {"wi_0", "wi_1", "wo"} if variant == "v1.1" else {"wi", "wo"}
    assert {p.rsplit(".", 1)[-1] for p in ad.modules} == {"q", "k", "v", "o"} | ffn
    assert not any(".block.1." in p for p in ad.modules)  # layers_to_transform=[0, 2]
    assert any(p.startswith("decoder.block.2.layer.1.EncDecAttention") for p in ad.modules)
    assert ad.modules["encoder.block.0.layer.1.DenseReluDense.wo"][0].shape[0] == 2  # rank_pattern
    out = np.asarray(T5Engine(model).forward(ids, mask, dids, dmask,
                                             lora=SingleLoraHook.from_adapter(ad)))
    err = np.abs(out - ref)[dmask.astype(bool)].max()
    assert err <= TOL, err


def _fake_adapter(d: Path, cfg: dict, tensors: dict):
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(tensors, d / "adapter_model.safetensors")


def test_adapter_of_other_family_or_wrong_modules_is_one_line(tmp_path):
    from hilora_jax.io.peft import AdapterError
    from hilora_jax.t5.lora import read_t5_adapter

    make_hf_t5(tmp_path / "base", "v1.1")
    cfg = load_t5(tmp_path / "base").config
    z = np.zeros((4, 40), np.float32)
    # a Llama adapter on a T5 base: refused by its targets, and by its keys
    _fake_adapter(tmp_path / "llama", {"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                       "target_modules": ["q_proj", "v_proj"]},
                  {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": z})
    with pytest.raises(AdapterError) as e:
        read_t5_adapter(tmp_path / "llama", cfg)
    assert "Llama-family" in _one_line(e) and "'target_modules'" in str(e.value)
    _fake_adapter(tmp_path / "llama2", {"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                        "target_modules": "all-linear"},
                  {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": z})
    with pytest.raises(AdapterError) as e:
        read_t5_adapter(tmp_path / "llama2", cfg)
    assert "Llama-family module" in _one_line(e)
    # targets q but the tensors hold only encoder block 0 (the config targets every block)
    _fake_adapter(tmp_path / "partial", {"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                         "target_modules": ["q"]},
                  {"base_model.model.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight": z,
                   "base_model.model.encoder.block.0.layer.0.SelfAttention.q.lora_B.weight":
                   np.zeros((35, 4), np.float32)})
    with pytest.raises(AdapterError) as e:
        read_t5_adapter(tmp_path / "partial", cfg)
    assert "config targets but no tensors" in _one_line(e)
    # a v1.0 ('wi') adapter on a v1.1 (gated) base
    _fake_adapter(tmp_path / "wi", {"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                    "target_modules": ["wi"]},
                  {"base_model.model.encoder.block.0.layer.1.DenseReluDense.wi.lora_A.weight": z})
    with pytest.raises(AdapterError) as e:
        read_t5_adapter(tmp_path / "wi", cfg)
    assert "DenseReluDense.wi.lora_A" in _one_line(e)
