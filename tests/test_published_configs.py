"""Published `config.json` / `adapter_config.json` files load (or are refused naming the field).

The corpus in `tests/data/published/` holds real files copied byte for byte from public repositories
(`SOURCES.md`). Every Llama-family config loads and the values we read agree with transformers'
`AutoConfig` of the same file (sizes, heads, eps, tied embeddings, sliding window, and RoPE inverse
frequencies computed by transformers' own rotary-embedding module). Every plain-LoRA adapter config
loads and the modules it adapts, with each module's rank and scale, agree with what PEFT 0.21's
`get_peft_model` builds from the same file on a Llama model. Files named `REFUSE_*` are refused with
an error naming the file, the field and the value. The policy's unit tests follow.
"""

import copy
import json
import math
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from hilora_jax.io.peft import (
    DEFAULT_TARGETS,
    MODULES,
    AdapterError,
    UnmatchedTargetWarning,
    check_config,
    is_targeted,
    module_key,
    module_rank_alpha,
    read_adapter_config,
)
from hilora_jax.model.config import ModelConfig, UnknownFieldWarning, UnsupportedConfigError

DATA = Path(__file__).parent / "data" / "published"
CONFIGS = sorted((DATA / "configs").glob("*.json"))
ADAPTERS = sorted((DATA / "adapters").glob("*.json"))
GOOD_CONFIGS = [p for p in CONFIGS if not p.name.startswith("REFUSE_")]
BAD_CONFIGS = [p for p in CONFIGS if p.name.startswith("REFUSE_")]
GOOD_ADAPTERS = [p for p in ADAPTERS if not p.name.startswith("REFUSE_")]
BAD_ADAPTERS = [p for p in ADAPTERS if p.name.startswith("REFUSE_")]

# Refused files: the field the error must name and a word of the reason.
CONFIG_REFUSALS = {
    "REFUSE_bloom-gpt3-finnish-small_merged_tf4.35.2.json": ("model_type", "fused qkv"),
    "REFUSE_deepseek-r1-671b_xft_tf4.46.3.json": ("model_type", "mixture-of-experts"),
    "REFUSE_gemma3-27b_nxdi_tf4.56.2.json": ("model_type", "Gemma"),
    "REFUSE_hunyuan-mt-7b_tf4.56.0.json": ("model_type", "does not implement"),
    "REFUSE_llama3-8b-eagle3-draft_specforge_tf4.28.1.json": ("architectures", "LlamaForCausalLMEagle3"),
    "REFUSE_mixtral-8x7b_eagle_tf4.32.0dev.json": ("model_type", "mixture-of-experts"),
    "REFUSE_phi-3-mini-4k_onnx_tf4.39.3.json": ("model_type", "fused qkv"),
    "REFUSE_qwen2.5-3b-unsloth-handedited_tf4.49.0.json": ("lora", "not known"),
    "REFUSE_qwen3-30b-a3b-moe_xft_tf4.51.0.json": ("model_type", "mixture-of-experts"),
    "REFUSE_tinyllama-1.1b_bnb4-merged_tf4.49.0.json": ("quantization_config", "quantized"),
}
ADAPTER_REFUSALS = {
    "REFUSE_bloom_query-key-value.json": ("target_modules", "query_key_value"),
    "REFUSE_chatglm-6b_query-key-value.json": ("target_modules", "query_key_value"),
    "REFUSE_glm-4-9b_fused.json": ("target_modules", "query_key_value"),
    "REFUSE_gpt-neox-3.6b_query-key-value.json": ("target_modules", "query_key_value"),
    "REFUSE_llama-3.2-3b_adalora_peft-bench.json": ("peft_type", "ADALORA"),
    "REFUSE_llama-3.2-3b_bdlora_peft-bench.json": ("use_bdlora", "target_modules_bd_a"),
    "REFUSE_llama-3.2-3b_dora_peft-bench.json": ("use_dora", "True"),
    "REFUSE_llama-3.2-3b_ia3_peft-bench.json": ("peft_type", "IA3"),
    "REFUSE_llama-3.2-3b_kasa_peft-bench.json": ("kasa_config", "beta"),
    "REFUSE_llama-3.2-3b_loha_peft-bench.json": ("peft_type", "LOHA"),
    "REFUSE_llama-3.2-3b_mica-init_peft-bench.json": ("init_lora_weights", "mica"),
    "REFUSE_mistral-7b_lm-head-target.json": ("target_modules", "lm_head"),
    "REFUSE_qwen-7b-v1_c-attn.json": ("target_modules", "c_proj"),
}
# Plain-LoRA files with target_modules entries no Llama module has (PEFT ignores them): one warning.
UNMATCHED_TARGETS = {"qwen3.5-hybrid_mixed-targets.json": "linear_fc2"}


def test_corpus_size_and_sources():
    assert len(GOOD_CONFIGS) >= 25 and len(GOOD_ADAPTERS) >= 25
    assert len(BAD_CONFIGS) >= 5 and len(BAD_ADAPTERS) >= 5
    assert {p.name for p in BAD_CONFIGS} == set(CONFIG_REFUSALS)
    assert {p.name for p in BAD_ADAPTERS} == set(ADAPTER_REFUSALS)
    sources = (DATA / "SOURCES.md").read_text()
    for p in CONFIGS + ADAPTERS:
        assert f"`{p.name}`" in sources, f"{p.name} has no row in SOURCES.md"
    # the span the corpus claims: transformers 4.27 .. 5.x, all four model types
    versions = {json.loads(p.read_text()).get("transformers_version", "")[:4] for p in GOOD_CONFIGS}
    assert {"4.27", "4.28", "4.31", "4.45", "4.51"} <= versions and any(v.startswith("5.") for v in versions)
    types = {json.loads(p.read_text()).get("model_type") for p in GOOD_CONFIGS}
    assert types == {"llama", "mistral", "qwen2", "qwen3"}


def _load_quiet(loader, path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = loader(path)
    return out, [w for w in caught if issubclass(w.category, UnknownFieldWarning)]


# -- model configs ----------------------------------------------------------------------------
@pytest.mark.parametrize("path", GOOD_CONFIGS, ids=lambda p: p.stem)
def test_published_config_loads_and_agrees_with_transformers(path, tmp_path):
    import torch
    from transformers import AutoConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    ours, unknown = _load_quiet(ModelConfig.from_hf_config, path)
    assert unknown == [], "every field of the published corpus is known to the policy"
    shutil.copy(path, tmp_path / "config.json")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tc = AutoConfig.from_pretrained(tmp_path)
    # the same file re-read through transformers 5 (its to_dict() layout) gives the same config
    again, unknown = _load_quiet(ModelConfig.from_hf_config, tc)
    assert again == ours and unknown == []
    raw = json.loads(path.read_text())
    assert ours.model_type == tc.model_type == raw.get("model_type", "llama")
    assert ours.vocab_size == tc.vocab_size
    assert ours.hidden_size == tc.hidden_size
    assert ours.intermediate_size == tc.intermediate_size
    assert ours.num_layers == tc.num_hidden_layers
    assert ours.num_heads == tc.num_attention_heads
    assert ours.num_kv_heads == tc.num_key_value_heads
    assert ours.head_dim == (getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads)
    assert ours.rms_norm_eps == tc.rms_norm_eps
    assert ours.tie_word_embeddings == tc.tie_word_embeddings
    assert ours.max_position_embeddings == tc.max_position_embeddings
    if ours.model_type in ("llama", "qwen3"):
        assert ours.qkv_bias == ours.o_bias == tc.attention_bias
    if ours.model_type == "llama":
        assert ours.mlp_bias == tc.mlp_bias
    if ours.model_type == "qwen2":
        assert ours.qkv_bias and not ours.o_bias  # Qwen2Attention: q/k/v bias=True, o_proj bias=False
    # the attention window transformers applies: Mistral's on every layer; Qwen per layer_types
    if ours.model_type == "mistral":
        assert ours.sliding_window == tc.sliding_window
    elif ours.model_type in ("qwen2", "qwen3"):
        assert set(tc.layer_types) == {"full_attention"} and ours.sliding_window is None
    else:
        assert ours.sliding_window is None
    # RoPE: transformers' own rotary module on this config
    emb = LlamaRotaryEmbedding(config=tc)
    ref = emb.inv_freq.to(torch.float32).numpy()
    np.testing.assert_allclose(ours.rope.inv_freq(ours.head_dim), ref, rtol=1e-6, atol=0)
    assert emb.attention_scaling == 1.0
    assert ours.rope.rope_type == emb.rope_type


@pytest.mark.parametrize("path", BAD_CONFIGS, ids=lambda p: p.stem)
def test_published_config_of_other_architecture_is_refused(path):
    field, reason = CONFIG_REFUSALS[path.name]
    with pytest.raises(UnsupportedConfigError) as e:
        ModelConfig.from_hf_config(path)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: field {field!r} = ")
    assert reason in msg
    value = json.loads(path.read_text())[field]
    assert repr(value)[:40] in msg, "the message shows the value"


# -- adapter configs ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama32():
    """A 32-layer Llama (tiny widths) for PEFT to adapt: the corpus' layer indices go up to 31."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=24,
                                        num_hidden_layers=32, num_attention_heads=2,
                                        num_key_value_heads=1))


def _peft_modules(base, adapter_dir) -> dict[tuple[int, str], tuple[int, float]]:
    """{(layer, module): (r, scale)} of the LoRA layers PEFT builds from `adapter_dir`."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(copy.deepcopy(base), LoraConfig.from_pretrained(str(adapter_dir)))
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, LoraLayer):
            parts = name.split(".")
            layer = int(parts[parts.index("layers") + 1])
            out[(layer, parts[-1])] = (mod.r["default"], float(mod.scaling["default"]))
    return out


def _our_modules(cfg, layers=32) -> dict[tuple[int, str], tuple[int, float]]:
    out = {}
    for li in range(layers):
        for m in MODULES:
            key = module_key(li, m)
            if is_targeted(cfg, key):
                r, _, scale = module_rank_alpha(cfg, key)
                out[(li, m)] = (r, scale)
    return out


@pytest.mark.parametrize("path", GOOD_ADAPTERS, ids=lambda p: p.stem)
def test_published_adapter_config_loads_and_agrees_with_peft(path, tmp_path, llama32):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = read_adapter_config(path)
    assert not [w for w in caught if issubclass(w.category, UnknownFieldWarning)]
    unmatched = [str(w.message) for w in caught if issubclass(w.category, UnmatchedTargetWarning)]
    if path.name in UNMATCHED_TARGETS:
        assert len(unmatched) == 1 and UNMATCHED_TARGETS[path.name] in unmatched[0]
    else:
        assert unmatched == []
    raw = json.loads(path.read_text())
    assert cfg["r"] == raw["r"] and cfg["lora_alpha"] == raw["lora_alpha"]
    d = tmp_path / "adapter"
    d.mkdir()
    shutil.copy(path, d / "adapter_config.json")
    theirs = _peft_modules(llama32, d)
    ours = _our_modules(cfg)
    assert theirs, "PEFT adapts something"
    assert set(ours) == set(theirs)
    for k in theirs:
        assert ours[k][0] == theirs[k][0]
        assert ours[k][1] == pytest.approx(theirs[k][1], rel=1e-12)


@pytest.mark.parametrize("path", BAD_ADAPTERS, ids=lambda p: p.stem)
def test_published_non_plain_lora_adapter_is_refused(path):
    field, value_part = ADAPTER_REFUSALS[path.name]
    with pytest.raises(AdapterError) as e:
        read_adapter_config(path)
    msg = str(e.value)
    assert "\n" not in msg
    assert f"({path}): field {field!r}" in msg
    assert value_part in msg


def test_issue_examples_load():
    """The three files of issue 11: Qwen2.5 with `use_mrope: false`, old PEFT's `enable_lora: null`,
    and the PEFT-0.19 layout with its new keys."""
    qwen = ModelConfig.from_hf_config(DATA / "configs" / "deepseek-r1-distill-qwen-1.5b_gspo_tf4.54.1.json")
    assert qwen.model_type == "qwen2" and qwen.num_layers == 28
    old = read_adapter_config(DATA / "adapters" / "llama-2-7b_q-k-v-o_peft-0.3-era.json")
    assert json.loads((DATA / "adapters" / "llama-2-7b_q-k-v-o_peft-0.3-era.json").read_text())["enable_lora"] is None
    assert old["target_modules"] == ["q_proj", "v_proj", "k_proj", "o_proj"]
    new = read_adapter_config(DATA / "adapters" / "tinyllama-chat_all-proj_peft-0.19.1.json")
    assert new["r"] == 16


def test_rslora_and_null_targets_read_as_peft_does():
    rs = read_adapter_config(DATA / "adapters" / "llama-3.2-3b_r64_rslora_peft-bench.json")
    assert rs["use_rslora"] is True and rs["target_modules"] == list(DEFAULT_TARGETS)
    r, alpha, scale = module_rank_alpha(rs, module_key(0, "q_proj"))
    assert (r, alpha, scale) == (64, 64.0, 64 / math.sqrt(64))


def test_default_targets_are_peft_defaults_for_every_supported_model_type():
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as mapping

    from hilora_jax.model.config import SUPPORTED_MODEL_TYPES

    for mt in SUPPORTED_MODEL_TYPES:
        assert list(mapping[mt]) == list(DEFAULT_TARGETS), mt


# -- PEFT parity on configs written by PEFT itself (features the corpus lacks) ----------------------
@pytest.mark.parametrize("kw", [
    dict(target_modules="all-linear"),
    dict(target_modules=["q_proj", "v_proj", "down_proj"], layers_to_transform=[0, 2, 31]),
    dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], layers_to_transform=3, layers_pattern="layers"),
    dict(target_modules=["q_proj", "v_proj", "gate_proj"], rank_pattern={"v_proj": 4, r"layers\.1\.self_attn\.q_proj": 2},
         alpha_pattern={"gate_proj": 3}, use_rslora=True),
    dict(target_modules="all-linear", exclude_modules=["down_proj", "k_proj"]),
    dict(target_modules=r".*\.(1|7)\.mlp\.(up|gate)_proj"),
    dict(target_modules=["mlp.up_proj", "self_attn.o_proj"], exclude_modules=r".*\.0\..*"),
], ids=["all-linear", "layers_to_transform", "layer+pattern", "rank/alpha_pattern+rslora", "exclude", "regex",
        "suffix+exclude-regex"])
def test_peft_written_config_agrees_with_peft(kw, tmp_path, llama32):
    from peft import LoraConfig

    LoraConfig(r=8, lora_alpha=16, task_type="CAUSAL_LM", **kw).save_pretrained(str(tmp_path))
    cfg, unknown = _load_quiet(read_adapter_config, tmp_path)
    assert unknown == []
    theirs = _peft_modules(llama32, tmp_path)
    ours = _our_modules(cfg)
    assert set(ours) == set(theirs) and theirs
    for k in theirs:
        assert ours[k][0] == theirs[k][0] and ours[k][1] == pytest.approx(theirs[k][1], rel=1e-12)


# -- policy unit tests: model configs ------------------------------------------------------------
@pytest.fixture
def base_cfg():
    return json.loads((DATA / "configs" / "smollm2-135m-instruct_merged_tf5.11.0.json").read_text())


def _warnings_of(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    return out, [str(w.message) for w in caught if issubclass(w.category, UnknownFieldWarning)]


@pytest.mark.parametrize("value", [None, False, "", [], {}])
def test_unknown_unset_field_is_accepted_with_one_warning(base_cfg, value):
    cfg, msgs = _warnings_of(lambda: ModelConfig.from_hf_config({**base_cfg, "future_flag": value},
                                                                 source="x/config.json"))
    assert cfg == ModelConfig.from_hf_config(base_cfg)
    assert len(msgs) == 1 and "\n" not in msgs[0]
    assert msgs[0].startswith("x/config.json: ") and f"future_flag={value!r}" in msgs[0]


def test_several_unset_unknown_fields_give_one_warning_line(base_cfg):
    _, msgs = _warnings_of(lambda: ModelConfig.from_hf_config({**base_cfg, "a_new": None, "b_new": False}))
    assert len(msgs) == 1 and "a_new=None" in msgs[0] and "b_new=False" in msgs[0]


@pytest.mark.parametrize("field,value", [("future_flag", 1), ("future_flag", True), ("future_flag", "yes"),
                                         ("future_flag", [0]), ("future_flag", {"a": 1}), ("future_flag", 0)])
def test_unknown_field_with_a_value_is_refused_naming_it(base_cfg, field, value, tmp_path):
    p = tmp_path / "config.json"
    p.write_text(json.dumps({**base_cfg, field: value}))
    with pytest.raises(UnsupportedConfigError) as e:
        ModelConfig.from_hf_config(p)
    assert str(e.value).startswith(f"{p}: field {field!r} = {value!r} is not known")


@pytest.mark.parametrize("field,value,reason", [
    ("use_mrope", True, "RoPE"),
    ("hidden_act", "gelu_pytorch_tanh", "SiLU"),
    ("pretraining_tp", 2, "pretraining_tp=1"),
    ("rope_interleaved", True, "rotate-half"),
    ("quantization_config", {"quant_method": "gptq", "bits": 4}, "quantized"),
    ("auto_map", {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}, "remote code"),
    ("is_encoder_decoder", True, "decoder-only"),
    ("add_cross_attention", True, "cross-attention"),
    ("pruned_heads", {"0": [1]}, "pruned"),
    ("num_local_experts", 8, "mixture-of-experts"),
    ("architectures", ["LlamaForSequenceClassification"], "LlamaForCausalLM"),
    ("rope_parameters", {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}, "yarn"),
    ("rope_parameters", {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}, "dynamic"),
    ("hidden_size", 0, "positive integer"),
])
def test_known_field_at_unsupported_value_is_refused(base_cfg, field, value, reason):
    with pytest.raises(UnsupportedConfigError) as e:
        ModelConfig.from_hf_config({**base_cfg, field: value}, source="cfg")
    msg = str(e.value)
    assert msg.startswith(f"cfg: field {field!r}") and reason in msg


@pytest.mark.parametrize("field,value", [
    ("use_mrope", False), ("quantization_config", None), ("auto_map", {"AutoConfig": "c.C"}),
    ("_name_or_path", "/some/where"), ("decoder_start_token_id", 3), ("sep_token_id", 7),
    ("unsloth_version", "2025.5.3"), ("transformers_version", "4.99"), ("torch_dtype", "float16"),
    ("temperature", 0.7), ("use_cache", False), ("max_sequence_length", 2048), ("is_decoder", False),
    ("attn_implementation", "flash_attention_2"), ("model_max_length", 4096),
])
def test_known_harmless_values_and_metadata_load_silently(base_cfg, field, value):
    cfg, msgs = _warnings_of(lambda: ModelConfig.from_hf_config({**base_cfg, field: value}))
    assert cfg == ModelConfig.from_hf_config(base_cfg) and msgs == []


def test_both_rope_layouts_read_the_same(base_cfg):
    """transformers 4.x (`rope_theta` + `rope_scaling`) and 5.x (`rope_parameters`) layouts."""
    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    v4 = {k: v for k, v in base_cfg.items() if k != "rope_parameters"}
    a = ModelConfig.from_hf_config({**v4, "rope_theta": 500000.0, "rope_scaling": scaling})
    b = ModelConfig.from_hf_config({**v4, "rope_parameters": {**scaling, "rope_theta": 500000.0}})
    assert a == b and a.rope.rope_type == "llama3" and a.rope.theta == 500000.0 and a.rope.factor == 32.0


def test_unreadable_config_file_is_named(tmp_path):
    p = tmp_path / "config.json"
    p.write_text("{not json")
    with pytest.raises(UnsupportedConfigError, match=rf"^{p}: unreadable config"):
        ModelConfig.from_hf_config(p)


# -- policy unit tests: adapter configs ----------------------------------------------------------
BASE_ADAPTER = json.loads((DATA / "adapters" / "tinyllama-chat_all-proj_peft-0.19.1.json").read_text())


@pytest.mark.parametrize("field", ["astra_config", "some_future_config"])
@pytest.mark.parametrize("value", [None, False, {}, []])
def test_adapter_unknown_unset_field_accepted_with_one_warning(field, value):
    cfg, msgs = _warnings_of(lambda: check_config({**BASE_ADAPTER, field: value}, "a"))
    assert cfg[field] == value
    assert len(msgs) == 1 and msgs[0].startswith("adapter 'a': ") and f"{field}={value!r}" in msgs[0]


def test_adapter_old_and_new_peft_keys_need_no_warning():
    cfg, msgs = _warnings_of(lambda: check_config({**BASE_ADAPTER, "enable_lora": None, "merge_weights": False}, "a"))
    assert msgs == [] and cfg["r"] == 16


@pytest.mark.parametrize("field,value", [
    ("astra_config", {"rank": 4}), ("some_future_config", 1), ("some_future_config", "on"),
    ("enable_lora", [True, False, True]), ("use_dora", True), ("lora_bias", True), ("bias", "all"),
    ("modules_to_save", ["lm_head"]), ("init_lora_weights", "pissa"), ("target_modules", ["q_proj", "embed_tokens"]),
    ("target_modules", ["Wqkv"]), ("target_modules", "lm_head|.*q_proj"), ("target_modules", []),
    ("layers_to_transform", ["0"]), ("rank_pattern", {"q_proj": 0}), ("r", 0), ("lora_alpha", float("nan")),
    ("peft_type", "LOKR"), ("use_rslora", "yes"),
])
def test_adapter_field_refused_naming_field_and_value(field, value, tmp_path):
    p = tmp_path / "adapter_config.json"
    p.write_text(json.dumps({**BASE_ADAPTER, field: value}))
    with pytest.raises(AdapterError) as e:
        read_adapter_config(p, "x")
    msg = str(e.value)
    assert msg.startswith(f"adapter 'x' ({p}): field {field!r}") and "\n" not in msg


def test_adapter_target_entries_accept_llama_paths():
    for entry in ["q_proj", "self_attn.q_proj", "mlp.down_proj", "model.layers.5.self_attn.v_proj",
                  "layers.5.mlp.up_proj"]:
        check_config({**BASE_ADAPTER, "target_modules": [entry]}, "a")
    with pytest.raises(AdapterError, match=r"no entry names a projection .*'mlp\.q_proj' matches no"):
        check_config({**BASE_ADAPTER, "target_modules": ["mlp.q_proj"]}, "a")


def test_adapter_targets_no_llama_module_has_are_ignored_with_one_warning():
    """PEFT ignores list entries that match nothing as long as one matches; so do we, saying so."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = check_config({**BASE_ADAPTER, "target_modules": ["q_proj", "c_attn", "W_pack"]}, "a")
    msgs = [str(w.message) for w in caught if issubclass(w.category, UnmatchedTargetWarning)]
    assert len(msgs) == 1 and "'c_attn', 'W_pack'" in msgs[0] and msgs[0].startswith("adapter 'a': ")
    assert _our_modules(cfg, layers=2) == {(0, "q_proj"): (16, 2.0), (1, "q_proj"): (16, 2.0)}
