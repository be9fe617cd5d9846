"""Strict loading: every bad input is one clear error naming the key/file/field; nothing
half-written; orbax round trips; sharded == unsharded with the rules table applied."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_utils import hf_logits, make_hf_model, padded_batch

from hilora_jax.cli import main as cli_main
from hilora_jax.inference import Engine
from hilora_jax.io.checkpoint import restore_model, save_model
from hilora_jax.io.loading import load_model
from hilora_jax.io.safetensors import CheckpointError, SafetensorsFile, save_file
from hilora_jax.model import sharding as shd
from hilora_jax.model.config import ModelConfig, UnsupportedConfigError


@pytest.fixture
def hf_dir(tmp_path):
    d = tmp_path / "hf"
    make_hf_model(d, "llama")
    return d


def _rewrite(d, fn):
    st = SafetensorsFile(d / "model.safetensors")
    tensors = {k: np.array(st[k]) for k in st}
    fn(tensors)
    del st
    save_file(tensors, d / "model.safetensors")


def test_missing_tensor_is_named(hf_dir):
    _rewrite(hf_dir, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor for parameter model\.layers\.1\.mlp\.up_proj\.kernel"):
        load_model(hf_dir, progress=False)


def test_extra_tensor_is_named(hf_dir):
    def add(t):
        t["model.layers.0.self_attn.extra_proj.weight"] = np.zeros((4, 4), np.float32)
    _rewrite(hf_dir, add)
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.extra_proj\.weight' in .*model\.safetensors"):
        load_model(hf_dir, progress=False)


def test_wrong_shape_is_named(hf_dir):
    def bad(t):
        t["model.layers.0.self_attn.k_proj.weight"] = np.zeros((8, 48), np.float32)
    _rewrite(hf_dir, bad)
    with pytest.raises(CheckpointError, match=r"k_proj\.weight' in .* has shape \(8, 48\), expected \(16, 48\)"):
        load_model(hf_dir, progress=False)


def test_all_problems_reported_at_once(hf_dir):
    def bad(t):
        t.pop("model.norm.weight")
        t["model.layers.0.input_layernorm.weight"] = np.full((48,), np.nan, np.float32)
    _rewrite(hf_dir, bad)
    with pytest.raises(CheckpointError) as e:
        load_model(hf_dir, progress=False)
    msg = str(e.value)
    assert "2 problem(s)" in msg and "model.norm.weight" in msg and "NaN" in msg


def test_truncated_safetensors_is_named(hf_dir):
    f = hf_dir / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor .* is truncated"):
        load_model(hf_dir, progress=False)
    f.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="too short"):
        load_model(hf_dir, progress=False)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("hidden_act", "gelu", "hidden_act"),
        ("rope_parameters", {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}, "yarn"),
        ("pretraining_tp", 2, "pretraining_tp"),
        ("some_new_field", 1, "some_new_field"),
        ("model_type", "gpt2", "model_type"),
        ("use_mrope", True, r"'use_mrope' = True"),
        ("quantization_config", {"quant_method": "awq", "bits": 4}, r"'quantization_config' = \{'quant_method': 'awq'"),
        ("some_new_field", {"on": 1}, r"'some_new_field' = \{'on': 1\} is not known"),
    ],
)
def test_unsupported_config_field_is_named(hf_dir, field, value, match):
    p = hf_dir / "config.json"
    cfg = json.loads(p.read_text())
    cfg[field] = value
    p.write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedConfigError, match=match):
        load_model(hf_dir, progress=False)


def test_unset_unknown_fields_load_with_one_warning(hf_dir):
    """Published configs carry fields transformers accepts when unset (e.g. Qwen2.5's
    `use_mrope: false`); an unknown one that is null/false/empty loads with one warning line."""
    from hilora_jax.model.config import UnknownFieldWarning

    p = hf_dir / "config.json"
    cfg = json.loads(p.read_text())
    ref = load_model(hf_dir, progress=False).config
    p.write_text(json.dumps({**cfg, "use_mrope": False, "future_a": None, "future_b": []}))
    with pytest.warns(UnknownFieldWarning) as rec:
        got = load_model(hf_dir, progress=False).config
    assert got == ref
    msgs = [str(w.message) for w in rec if issubclass(w.category, UnknownFieldWarning)]
    assert len(msgs) == 1 and "future_a=None" in msgs[0] and "future_b=[]" in msgs[0]
    assert str(p) in msgs[0] and "use_mrope" not in msgs[0]


def test_qwen2_per_layer_sliding_window_rejected():
    with pytest.raises(UnsupportedConfigError, match="layer_types"):
        ModelConfig.from_hf_config({
            "model_type": "qwen2", "vocab_size": 61, "hidden_size": 48, "intermediate_size": 40,
            "num_hidden_layers": 2, "num_attention_heads": 6, "num_key_value_heads": 2,
            "layer_types": ["full_attention", "sliding_attention"], "sliding_window": 4})


def test_sharded_index_checkpoint(tmp_path):
    """`model.safetensors.index.json` + several shard files load like a single file."""
    d = tmp_path / "sharded"
    hf = make_hf_model(d, "qwen2")
    hf.save_pretrained(str(d), max_shard_size="20KB")
    assert (d / "model.safetensors.index.json").exists()
    ids, mask = padded_batch(np.random.default_rng(0), (6, 4), 6)
    out = np.asarray(Engine(load_model(d, progress=False)).forward(ids, mask))
    assert np.abs(out - hf_logits(hf, ids, mask))[mask.astype(bool)].max() <= 1e-4


def test_orbax_round_trip_exact(hf_dir, tmp_path):
    model = load_model(hf_dir, progress=False)
    out = save_model(model, tmp_path / "conv")
    back = restore_model(out)
    a = jax.tree.leaves(nnx.state(model, nnx.Param))
    b = jax.tree.leaves(nnx.state(back, nnx.Param))
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert back.config == model.config
    # the converted dir is itself a model source
    assert load_model(out).config == model.config


def test_convert_model_cli_leaves_nothing_on_failure(hf_dir, tmp_path, capsys):
    (hf_dir / "config.json").write_text(json.dumps({**json.loads((hf_dir / "config.json").read_text()), "hidden_act": "relu"}))
    out = tmp_path / "out"
    assert cli_main(["convert-model", str(hf_dir), str(out)]) == 2  # one line, exit 2
    assert capsys.readouterr().err.startswith("hilora: error: ")
    with pytest.raises(UnsupportedConfigError):  # the library itself raises
        load_model(hf_dir)
    assert not out.exists()
    assert not any(p.name.startswith(".out.") for p in tmp_path.iterdir())


def test_convert_model_cli_and_generate(hf_dir, tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(61)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="w2", pad_token="w0").save_pretrained(hf_dir)
    out = tmp_path / "conv"
    assert cli_main(["convert-model", str(hf_dir), str(out)]) == 0
    assert (out / "hilora_model.json").exists() and (out / "tokenizer").exists()
    assert cli_main(["generate", "--model", str(out), "--prompt", "w5 w7 w9",
                     "--max-new-tokens", "5", "--no-chat-template"]) == 0
    assert "### prompt: w5 w7 w9" in capsys.readouterr().out


def test_sharded_forward_equals_unsharded_and_follows_rules(tmp_path):
    # dims divisible by the model axis (4) so every rule applies without fallback
    d = tmp_path / "m"
    make_hf_model(d, "llama", vocab_size=64, intermediate_size=64, kv_heads=2)
    mesh = shd.make_mesh(2, 4)
    sharded = load_model(d, mesh=mesh, progress=False)
    plain = load_model(d, progress=False)
    for path, var in nnx.to_flat_state(nnx.state(sharded, nnx.Param)):
        name = ".".join(map(str, path))
        want = shd.param_sharding(name, var.get_value().shape, mesh, strict=True)
        assert var.get_value().sharding.is_equivalent_to(want, var.get_value().ndim), name
    q = sharded.model.layers[0].self_attn.q_proj.kernel.get_value()
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "model")
    emb = sharded.model.embed_tokens.embedding.get_value()
    assert emb.sharding.spec == jax.sharding.PartitionSpec("model", None)
    ids, mask = padded_batch(np.random.default_rng(2), (9, 4, 7, 2), 9, vocab=64)
    a = np.asarray(Engine(sharded, mesh=mesh).forward(ids, mask))
    b = np.asarray(Engine(plain).forward(ids, mask))
    assert np.abs(a - b).max() <= 1e-5
    ga = Engine(sharded, mesh=mesh).generate([[5, 6, 7], [9, 3]], max_new_tokens=8, stop_tokens=[-1])
    gb = Engine(plain).generate([[5, 6, 7], [9, 3]], max_new_tokens=8, stop_tokens=[-1])
    np.testing.assert_array_equal(ga.tokens, gb.tokens)


def test_orbax_restore_into_sharding(tmp_path):
    d = tmp_path / "m"
    make_hf_model(d, "llama", vocab_size=64, intermediate_size=64)
    out = save_model(load_model(d, progress=False), tmp_path / "conv")
    mesh = shd.make_mesh(2, 4)
    back = restore_model(out, mesh=mesh)
    k = back.model.layers[1].mlp.down_proj.kernel.get_value()
    assert k.sharding.spec == jax.sharding.PartitionSpec("model", None)
    assert len(k.addressable_shards) == 8 and k.addressable_shards[0].data.shape == (16, 48)


def test_non_divisible_dims_fall_back_to_replicated_and_are_reported():
    mesh = shd.make_mesh(2, 4)
    fb = []
    s = shd.param_sharding("model.embed_tokens.embedding", (61, 48), mesh, fallbacks=fb)
    assert s.spec == jax.sharding.PartitionSpec(None, None) and fb and fb[0][2] == "vocab"
    with pytest.raises(ValueError, match="not divisible"):
        shd.param_sharding("model.embed_tokens.embedding", (61, 48), mesh, strict=True)


def test_over_long_input_is_refused(hf_dir):
    eng = Engine(load_model(hf_dir, progress=False))
    with pytest.raises(ValueError, match="max_position_embeddings=256"):
        eng.forward(np.ones((1, 300), np.int32))
    with pytest.raises(ValueError, match="exceeds"):
        eng.generate([[3] * 200], max_new_tokens=100)


def test_bfloat16_restore_cast(hf_dir, tmp_path):
    out = save_model(load_model(hf_dir, progress=False), tmp_path / "c")
    m = restore_model(out, dtype=jnp.bfloat16)
    assert m.model.norm.weight.get_value().dtype == jnp.bfloat16
    shutil.rmtree(out)


def test_convert_script_front(hf_dir, tmp_path):
    """`convert/convert_model.py` is a thin front over the same CLI."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "convert" / "convert_model.py"
    out = tmp_path / "via_script"
    res = subprocess.run([sys.executable, str(script), str(hf_dir), str(out)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert load_model(out).config == load_model(hf_dir, progress=False).config
