"""Every rejected config field and malformed adapter fails with an error naming adapter and key,
and `convert_pool` leaves nothing on disk when it fails."""

import json
import shutil

import numpy as np
import pytest
from hf_utils import make_hf_model
from peft_utils import make_peft_adapter

from hilora_jax.io.peft import AdapterError, read_adapter
from hilora_jax.io.safetensors import SafetensorsFile, save_file
from hilora_jax.lora import ManifestError, convert_pool, load_pool

KEY_A = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"
KEY_B = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    root = tmp_path_factory.mktemp("errs")
    make_hf_model(root / "base", "llama", layers=2)
    make_peft_adapter(root / "base", root / "good", r=4, lora_alpha=8,
                      target_modules=["q_proj", "v_proj"])
    return root


def _copy(good, tmp_path, name="bad"):
    d = tmp_path / name
    shutil.copytree(good / "good", d)
    return d


def _edit_config(d, **kw):
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg.update(kw)
    (d / "adapter_config.json").write_text(json.dumps(cfg))


def _edit_tensors(d, fn):
    f = d / "adapter_model.safetensors"
    t = {k: np.array(v) for k, v in SafetensorsFile(f).items()}
    fn(t)
    save_file(t, f)


def _convert_fails(good, tmp_path, adapter_dir, match, exc=AdapterError, name="bad"):
    """convert_pool raises `exc` matching `match` (and the adapter name); nothing is written."""
    manifest = {"adapters": {"ok": {"path": str(good / "good")}, name: {"path": str(adapter_dir)}}}
    out = tmp_path / "out" / "pool"
    with pytest.raises(exc, match=match) as ei:
        convert_pool(manifest, good / "base", out, progress=False)
    assert not out.exists()
    assert not (out.parent.exists() and list(out.parent.iterdir())), "temp files left behind"
    return str(ei.value)


REJECTED = [
    ("use_dora", True), ("lora_bias", True), ("bias", "all"), ("bias", "lora_only"),
    ("modules_to_save", ["lm_head"]), ("layer_replication", [[0, 1]]),
    ("target_parameters", ["mlp.experts.down_proj"]), ("fan_in_fan_out", True),
    ("init_lora_weights", "pissa"), ("init_lora_weights", "olora"), ("loftq_config", {"bits": 4}),
    ("alora_invocation_tokens", [5, 6]), ("trainable_token_indices", [1, 2]),
    ("arrow_config", {"top_k": 3}), ("use_qalora", True), ("megatron_config", {"x": 1}),
    ("some_future_field", 1), ("peft_type", "IA3"), ("astra_config", {"rank": 4}),
    ("enable_lora", [True, False, True]), ("target_modules", ["q_proj", "lm_head"]),
]


@pytest.mark.parametrize("field,value", REJECTED, ids=[f"{f}={v}" for f, v in REJECTED])
def test_rejected_fields(good, tmp_path, field, value):
    d = _copy(good, tmp_path)
    _edit_config(d, **{field: value})
    msg = _convert_fails(good, tmp_path, d, rf"adapter 'bad'.*'{field}'")
    assert "bad" in msg


def test_harmless_fields_accepted(good, tmp_path):
    d = _copy(good, tmp_path)
    _edit_config(d, lora_dropout=0.3, inference_mode=False, init_lora_weights="gaussian",
                 revision="main", eva_config=None, enable_lora=None, merge_weights=False)
    read_adapter(d, _cfg(good))


def test_unset_unknown_field_converts_with_one_warning(good, tmp_path):
    """Current PEFT's `astra_config: null` (unknown to us, unset) converts, with one warning line."""
    from hilora_jax.model.config import UnknownFieldWarning

    d = _copy(good, tmp_path)
    _edit_config(d, astra_config=None)
    manifest = {"adapters": {"ok": {"path": str(good / "good")}, "bad": {"path": str(d)}}}
    with pytest.warns(UnknownFieldWarning) as rec:
        convert_pool(manifest, good / "base", tmp_path / "pool", progress=False)
    msgs = [str(w.message) for w in rec if issubclass(w.category, UnknownFieldWarning)]
    assert len(msgs) == 1 and msgs[0].startswith("adapter 'bad'") and "astra_config=None" in msgs[0]
    assert (tmp_path / "pool").is_dir()


def _cfg(good):
    from hilora_jax.model.config import ModelConfig

    return ModelConfig.from_hf_config(good / "base" / "config.json")


@pytest.mark.parametrize("which,key", [("A", KEY_A), ("B", KEY_B)])
def test_missing_tensor(good, tmp_path, which, key):
    d = _copy(good, tmp_path)
    _edit_tensors(d, lambda t: t.pop(key))
    _convert_fails(good, tmp_path, d, rf"adapter 'bad'.*missing '{key}'")


def test_wrong_shape(good, tmp_path):
    d = _copy(good, tmp_path)

    def fn(t):
        t[KEY_B] = np.zeros((17, 4), np.float32)

    _edit_tensors(d, fn)
    _convert_fails(good, tmp_path, d, rf"adapter 'bad'.*{KEY_B}.*shape \(17, 4\), expected \(16, 4\)")


def test_rank_disagrees_with_config(good, tmp_path):
    d = _copy(good, tmp_path)
    _edit_config(d, r=8)
    _convert_fails(good, tmp_path, d, r"adapter 'bad'.*lora_A.weight' has shape \(4, 48\), "
                   r"expected \(8, 48\)")


def test_nan_weights(good, tmp_path):
    d = _copy(good, tmp_path)

    def fn(t):
        t[KEY_A][0, 3] = np.nan

    _edit_tensors(d, fn)
    _convert_fails(good, tmp_path, d, rf"adapter 'bad'.*{KEY_A}.*NaN")


def test_truncated_file(good, tmp_path):
    d = _copy(good, tmp_path)
    f = d / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    _convert_fails(good, tmp_path, d, r"adapter 'bad'.*truncated")


def test_unreadable_files(good, tmp_path):
    d = _copy(good, tmp_path)
    (d / "adapter_model.safetensors").write_bytes(b"\x01\x02")
    _convert_fails(good, tmp_path, d, r"adapter 'bad'.*too short")
    d2 = _copy(good, tmp_path, "bad2")
    (d2 / "adapter_config.json").write_text("{not json")
    _convert_fails(good, tmp_path, d2, r"adapter 'bad2'.*adapter_config.json.*unreadable", name="bad2")
    d3 = _copy(good, tmp_path, "bad3")
    (d3 / "adapter_model.safetensors").unlink()
    _convert_fails(good, tmp_path, d3, r"adapter 'bad3'.*neither adapter_model", name="bad3")


def test_unexpected_and_out_of_range_keys(good, tmp_path):
    d = _copy(good, tmp_path)

    def fn(t):
        t["base_model.model.lm_head.lora_A.weight"] = np.zeros((4, 48), np.float32)

    _edit_tensors(d, fn)
    _convert_fails(good, tmp_path, d, r"adapter 'bad'.*unexpected tensor keys.*lm_head")
    d2 = _copy(good, tmp_path, "bad2")

    def fn2(t):
        t[KEY_A.replace("layers.1", "layers.5")] = t[KEY_A]

    _edit_tensors(d2, fn2)
    _convert_fails(good, tmp_path, d2, r"adapter 'bad2'.*layer 5.*2 layers", name="bad2")


def test_config_and_tensors_disagree(good, tmp_path):
    d = _copy(good, tmp_path)
    _edit_config(d, target_modules=["q_proj", "v_proj", "k_proj"])
    _convert_fails(good, tmp_path, d, r"adapter 'bad'.*disagree.*k_proj")


def test_shape_mismatch_with_base(good, tmp_path):
    make_hf_model(tmp_path / "wide", "llama", layers=2, hidden_size=60, head_dim=10)
    with pytest.raises(AdapterError, match=r"adapter 'good'.*expected"):
        load_pool({"adapters": {"good": str(good / "good")}}, model=tmp_path / "wide",
                  progress=False)


def test_empty_pool(good, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ManifestError, match="empty"):
        convert_pool({"adapters": {}}, good / "base", out, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="empty"):
        convert_pool(tmp_path / "empty", good / "base", out, progress=False)
    assert not out.exists()


def test_manifest_errors(good, tmp_path):
    bad = tmp_path / "m.json"
    bad.write_text('{"adapters": {"a": {"path": "x", "smaples": []}}}')
    with pytest.raises(ManifestError, match=r"adapter 'a': unknown fields \['smaples'\]"):
        load_pool(bad, model=good / "base", progress=False)
    (tmp_path / "s.jsonl").write_text('{"txt": "no"}\n')
    bad.write_text(json.dumps({"adapters": {"a": {"path": str(good / "good"),
                                                  "samples_file": "s.jsonl"}}}))
    with pytest.raises(ManifestError, match=r"adapter 'a'.*s.jsonl:1.*'text'"):
        load_pool(bad, model=good / "base", progress=False)


def test_bin_without_torch_and_offline_hub(good, tmp_path, monkeypatch):
    d = _copy(good, tmp_path)
    (d / "adapter_model.safetensors").rename(d / "adapter_model.bin")
    monkeypatch.setitem(__import__("sys").modules, "torch", None)
    with pytest.raises(AdapterError, match=r"adapter 'bad'.*needs torch"):
        read_adapter(d, _cfg(good), name="bad")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(AdapterError, match=r"adapter 'hub'.*HF_HUB_OFFLINE"):
        read_adapter("no-such-org/no-such-adapter", _cfg(good), name="hub")
