"""Model configuration: one frozen dataclass for the Llama family, read strictly from HF configs.

`ModelConfig.from_hf_config` reads both the transformers 4.x layout (`rope_theta`, `rope_scaling`,
`torch_dtype`) and the 5.x layout (`rope_parameters`, `dtype`, `layer_types`). The policy for every field
of a `config.json` (the same one `io.peft.check_config` applies to `adapter_config.json`):

* read: a field we implement is read (`hidden_size`, `num_key_value_heads`, `rope_scaling`, ...);
* value-checked: a known field is allowed only at values that keep the maths we implement
  (`hidden_act == "silu"`, `pretraining_tp == 1`, `use_mrope == false`, no `quantization_config`, ...);
  any other value is refused naming the field and the value;
* metadata: fields that cannot touch the forward maths are ignored (`*_token_id`, names and paths,
  `transformers_version`, `torch_dtype` / `dtype`, `use_cache`, generation defaults and the other keys
  `PretrainedConfig.to_dict()` adds when saving, training-tool stamps such as `unsloth_version`);
* unknown: a field unknown to us whose value is unset (null, false, "", [] or {}) is accepted with one
  `UnknownFieldWarning` line per config (as transformers and PEFT do); with any other value it is
  refused naming the field and the value.

Configs of other architectures are refused naming the reason (fused qkv, mixture of experts, Gemma's
norm/embedding/activation differences, multimodal wrappers, remote code, non-causal-LM heads), so a
checkpoint that differs in a way we do not implement can never load silently with wrong results.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from hilora_jax.errors import HiloraUserError


class UnsupportedConfigError(HiloraUserError, ValueError):
    """A config field (or value) would change the model's maths in a way we do not implement."""


class UnknownFieldWarning(UserWarning):
    """A config field unknown to hilora-jax was accepted because its value is unset."""


SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

# Causal-LM classes per model_type. `LLaMAForCausalLM` is the name of transformers' pre-release
# 4.27.0.dev0 conversion (same maths).
_ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "LLaMAForCausalLM"),
    "mistral": ("MistralForCausalLM",),
    "qwen2": ("Qwen2ForCausalLM",),
    "qwen3": ("Qwen3ForCausalLM",),
}

# Why other architectures are refused, by model_type.
_FUSED_QKV = ("phi3", "phi", "gpt_neox", "gpt_neox_japanese", "bloom", "falcon", "gpt2", "chatglm",
              "glm", "qwen", "internlm2", "baichuan", "mpt", "gpt_bigcode", "dbrx", "starcoder2",
              "persimmon", "codegen", "gptj", "stablelm", "olmo", "olmo2", "cohere", "exaone")
_MOE = ("mixtral", "qwen2_moe", "qwen3_moe", "qwen3_next", "deepseek_v2", "deepseek_v3", "jamba",
        "olmoe", "granitemoe", "granitemoeshared", "phimoe", "llama4", "llama4_text", "gpt_oss",
        "glm4_moe", "hunyuan_v1_moe", "kimi_k2", "minimax", "ernie4_5_moe", "dots1", "bailing_moe",
        "switch_transformers", "nllb_moe", "qwen3_5_moe", "qwen35_moe")
_GEMMA = ("gemma", "gemma2", "gemma3", "gemma3_text", "gemma3n", "gemma3n_text", "recurrent_gemma",
          "paligemma", "shieldgemma2")
_EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size",
                "num_experts_per_tok")
_SUBMODEL_KEYS = ("text_config", "vision_config", "audio_config", "encoder", "decoder")


def _other_architecture(cfg: Mapping[str, Any], mt: Any) -> str:
    if mt in _MOE or any(cfg.get(k) for k in _EXPERT_KEYS):
        return "a mixture-of-experts model (routed expert MLPs are not implemented)"
    if mt in _GEMMA:
        return ("Gemma (RMSNorm scaled by 1 + w, embeddings scaled by sqrt(hidden_size), GeGLU MLP "
                "are not implemented)")
    if any(k in cfg for k in _SUBMODEL_KEYS):
        return "a multimodal / composite model (only decoder-only text models are implemented)"
    if mt in _FUSED_QKV:
        return ("an architecture with a fused qkv projection or other block layout "
                "(only separate q/k/v/o and gate/up/down projections are implemented)")
    return "an architecture hilora-jax does not implement"


# Fields we read (each is validated where it is read).
_READ = {
    "model_type", "architectures", "vocab_size", "hidden_size", "intermediate_size",
    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
    "rope_theta", "rope_scaling", "rope_parameters", "max_position_embeddings",
    "tie_word_embeddings", "attention_bias", "mlp_bias", "sliding_window", "use_sliding_window",
    "max_window_layers", "layer_types", "bos_token_id", "eos_token_id", "pad_token_id",
}
# Known fields allowed only at values that keep the maths we implement: field -> (ok(value), why).
_VALUE_CHECKED: dict[str, tuple[Any, str]] = {
    "hidden_act": (lambda v: v in ("silu", None), "only the SiLU-gated MLP is implemented"),
    "pretraining_tp": (lambda v: v in (1, None), "only pretraining_tp=1 is implemented"),
    "rope_interleaved": (lambda v: not v, "only rotate-half RoPE is implemented"),
    "use_mrope": (lambda v: not v, "multimodal (3-D) RoPE is not implemented"),
    "quantization_config": (lambda v: not v, "quantized checkpoints are not supported; use a "
                            "dequantized (fp32/bf16/fp16) checkpoint"),
    "is_encoder_decoder": (lambda v: not v, "only decoder-only models are implemented"),
    "add_cross_attention": (lambda v: not v, "cross-attention is not implemented"),
    "cross_attention_hidden_size": (lambda v: v is None, "cross-attention is not implemented"),
    "pruned_heads": (lambda v: not v, "pruned attention heads are not implemented"),
    "auto_map": (lambda v: not any(str(k).startswith("AutoModel") for k in (v or {})),
                 "the model's maths is in custom remote code"),
}
# Metadata: cannot change the forward maths.
_METADATA = {
    # names, paths, versions, dtypes, implementation choices
    "transformers_version", "torch_dtype", "dtype", "use_bfloat16", "name_or_path", "tokenizer_class",
    "prefix", "task_specific_params", "finetuning_task", "problem_type", "id2label", "label2id",
    "custom_pipelines", "use_cache", "torchscript", "tf_legacy_loss", "chunk_size_feed_forward",
    "output_hidden_states", "output_attentions", "return_dict", "use_return_dict", "is_decoder",
    "tie_encoder_decoder", "initializer_range", "initializer_factor", "model_max_length",
    # attention kernel / training switches (same maths)
    "attn_implementation", "use_flash_attention_2", "use_flash_attn", "use_sdpa",
    "gradient_checkpointing",
    # dropouts (inactive at inference)
    "attention_dropout", "hidden_dropout", "embd_pdrop", "resid_pdrop",
    # generation defaults that PretrainedConfig.to_dict() writes (transformers <= 4.40)
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
    "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
    "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "output_scores", "return_dict_in_generate", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
    # exporters and training tools
    "transformers.js_config", "is_llama_config", "unsloth_version", "unsloth_fixed",
    # LLaMA-1 conversions (transformers 4.27/4.28) stamped the training context length; Llama's
    # modelling code never reads it (max_position_embeddings is what RoPE uses)
    "max_sequence_length",
}
_METADATA_RE = re.compile(r"^_.*|.*_token_ids?$")  # _name_or_path, _commit_hash, ...; *_token_id(s)


def _unset(v: Any) -> bool:
    return v is None or v is False or (isinstance(v, (str, list, tuple, dict)) and len(v) == 0)


def unknown_fields_warning(where: str, fields: Mapping[str, Any]) -> None:
    """One `UnknownFieldWarning` line for all the unset unknown fields of one file."""
    if fields:
        listed = ", ".join(f"{k}={v!r}" for k, v in sorted(fields.items()))
        warnings.warn(f"{where}: accepting field(s) unknown to hilora-jax because they are unset: "
                      f"{listed}", UnknownFieldWarning, stacklevel=3)


_SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")



def screen_fields(cfg: Mapping[str, Any], bad, *, known, value_checked: Mapping[str, tuple[Any, str]],
                  refuse=None) -> dict[str, Any]:
    """The strict field policy shared by every config reader: fields `known(k)` (read or metadata)
    pass; fields in `value_checked` must satisfy their check; other fields are accepted only when
    unset (returned, for `unknown_fields_warning`); `refuse(k, v)` may raise a more specific error
    first; any other set field raises `bad(k, ...)`."""
    unset_unknown: dict[str, Any] = {}
    for k in sorted(cfg):
        v = cfg[k]
        if known(k) or _METADATA_RE.fullmatch(k):
            continue
        if k in value_checked:
            ok, why = value_checked[k]
            if not ok(v):
                raise bad(k, f"= {_short_repr(v)}: {why}")
            continue
        if _unset(v):
            unset_unknown[k] = v
            continue
        if refuse is not None:
            refuse(k, v)
        raise bad(k, f"= {_short_repr(v)} is not known to hilora-jax and may change the "
                  "model's maths; refusing (unknown fields are accepted only when unset)")
    return unset_unknown


def check_positive_ints(cfg: Mapping[str, Any], bad, keys) -> None:
    """Each of `keys` present in `cfg` is a positive int (not a bool), else `bad(key, ...)`."""
    for k in keys:
        v = cfg.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            raise bad(k, f"= {v!r} must be a positive integer")

def read_config_mapping(cfg: Mapping[str, Any] | Any, source: str = "config"
                        ) -> tuple[dict[str, Any], str]:
    """A HF config (path to `config.json`, mapping, or `PretrainedConfig`) as a plain dict, and
    the source to name in errors (the file when a path is given). Raises
    `UnsupportedConfigError` (one line) for an unreadable file or a non-object. Shared by every
    family's `from_hf_config` (Llama here, T5 in `hilora_jax.t5.config`)."""
    if isinstance(cfg, (str, Path)):
        source = str(cfg)
        try:
            cfg = json.loads(Path(cfg).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UnsupportedConfigError(f"{source}: unreadable config ({e})") from e
    elif not isinstance(cfg, Mapping) and hasattr(cfg, "to_dict"):
        cfg = cfg.to_dict()
    if not isinstance(cfg, Mapping):
        raise UnsupportedConfigError(f"{source}: a config must be a JSON object, got "
                                     f"{type(cfg).__name__}")
    return dict(cfg), source


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def inv_freq(self, head_dim: int) -> np.ndarray:
        """Inverse frequencies `[H/2]` in float32, computed exactly as transformers does."""
        exps = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
        inv = (np.float32(1.0) / (np.float32(self.theta) ** exps)).astype(np.float32)
        if self.rope_type == "linear":
            inv = (inv / np.float32(self.factor)).astype(np.float32)
        elif self.rope_type == "llama3":
            old = self.original_max_position_embeddings
            low_wl = old / self.low_freq_factor
            high_wl = old / self.high_freq_factor
            wavelen = (2 * math.pi / inv).astype(np.float32)
            inv_l = np.where(wavelen > low_wl, inv / np.float32(self.factor), inv).astype(np.float32)
            smooth = ((old / wavelen - self.low_freq_factor)
                      / (self.high_freq_factor - self.low_freq_factor)).astype(np.float32)
            smoothed = ((1 - smooth) * inv_l / np.float32(self.factor) + smooth * inv_l)
            medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
            inv = np.where(medium, smoothed, inv_l).astype(np.float32)
        return inv


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder-only Llama-family transformer (Llama 1/2/3, Mistral, Qwen2, Qwen3, SmolLM2)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = dataclasses.field(default_factory=RopeConfig)
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2; Llama `attention_bias` (which also biases o_proj)
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    sliding_window: int | None = None  # applied to every layer when set
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedConfigError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """`(d_in, d_out)` of every adaptable projection, by HF module name (`projections`)."""
        from hilora_jax.model.projections import module_shapes

        return module_shapes(self)

    # -- HF interop -------------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any] | Any, *, source: str = "config") -> ModelConfig:
        """Build from a HF config (dict, `PretrainedConfig`, or path to `config.json`).

        Applies the module's field policy: raises `UnsupportedConfigError` naming the file, the
        field and the value for an unknown field with a value, a known field at a value whose maths
        is not implemented, or another architecture (with the reason); warns once
        (`UnknownFieldWarning`) about unknown fields that are unset.
        """
        cfg, source = read_config_mapping(cfg, source)

        def bad(field: str, why: str) -> UnsupportedConfigError:
            return UnsupportedConfigError(f"{source}: field {field!r} {why}")

        mt = cfg.get("model_type", "llama")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise bad("model_type", f"= {mt!r}: {_other_architecture(cfg, mt)} "
                      f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        archs = cfg.get("architectures") or []
        if not isinstance(archs, list) or any(a not in _ARCHITECTURES[mt] for a in archs):
            raise bad("architectures", f"= {archs!r}: only {' / '.join(_ARCHITECTURES[mt])} is "
                      f"implemented for model_type {mt!r}")
        def refuse(k: str, v: Any) -> None:
            if k in _EXPERT_KEYS:
                raise bad(k, f"= {_short_repr(v)}: {_other_architecture(cfg, mt)}")

        unset_unknown = screen_fields(cfg, bad, known=lambda k: k in _READ or k in _METADATA,
                                      value_checked=_VALUE_CHECKED, refuse=refuse)
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in cfg]
        if missing:
            raise bad(missing[0], f"is required and missing (all missing: {missing})")
        check_positive_ints(cfg, bad, ("vocab_size", "hidden_size", "intermediate_size",
                                       "num_hidden_layers", "num_attention_heads",
                                       "num_key_value_heads", "head_dim", "max_position_embeddings"))
        unknown_fields_warning(source, unset_unknown)

        rope = _read_rope(cfg, bad)
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        head_dim = cfg.get("head_dim") or hidden // heads
        sliding = _read_sliding_window(cfg, mt, bad)
        eos = cfg.get("eos_token_id")
        eos = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
        attention_bias = bool(cfg.get("attention_bias", False))
        return cls(
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope=rope,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=True if mt == "qwen2" else attention_bias,
            o_bias=attention_bias and mt in ("llama", "qwen3"),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=mt == "qwen3",
            sliding_window=sliding,
            model_type=mt,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=eos,
            pad_token_id=cfg.get("pad_token_id"),
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        d = dict(d)
        d["rope"] = RopeConfig(**d["rope"])
        d["eos_token_id"] = tuple(d.get("eos_token_id") or ())
        return cls(**d)


def _short_repr(v: Any, limit: int = 120) -> str:
    r = repr(v)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def _read_rope(cfg: dict, bad) -> RopeConfig:
    params = cfg.get("rope_parameters")
    if params is None:  # transformers 4.x layout
        params = dict(cfg.get("rope_scaling") or {})
        params.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
        field = "rope_scaling"
    else:
        params = dict(params)
        if "rope_theta" not in params and "rope_theta" in cfg:
            params["rope_theta"] = cfg["rope_theta"]
        field = "rope_parameters"
    if not isinstance(params, dict) or (params and isinstance(next(iter(params.values())), dict)):
        raise bad(field, "per-layer-type RoPE parameters are not supported")
    rtype = params.get("rope_type", params.get("type", "default"))
    if rtype not in _SUPPORTED_ROPE_TYPES:
        raise bad(field, f"rope_type={rtype!r} is not supported (supported: {_SUPPORTED_ROPE_TYPES})")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise bad(field, "partial_rotary_factor != 1 is not supported")
    known = {"rope_type", "type", "rope_theta", "factor", "low_freq_factor", "high_freq_factor",
             "original_max_position_embeddings", "partial_rotary_factor"}
    extra = sorted(set(params) - known)
    if extra:
        raise bad(field, f"has unhandled RoPE keys {extra}")
    kw: dict[str, Any] = {"theta": float(params.get("rope_theta", 10000.0)), "rope_type": rtype}
    if rtype in ("linear", "llama3"):
        if "factor" not in params:
            raise bad(field, f"rope_type={rtype!r} needs 'factor'")
        kw["factor"] = float(params["factor"])
    if rtype == "llama3":
        for k in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if k not in params:
                raise bad(field, f"rope_type='llama3' needs {k!r}")
        kw["low_freq_factor"] = float(params["low_freq_factor"])
        kw["high_freq_factor"] = float(params["high_freq_factor"])
        kw["original_max_position_embeddings"] = int(params["original_max_position_embeddings"])
    return RopeConfig(**kw)


def _read_sliding_window(cfg: dict, model_type: str, bad) -> int | None:
    window = cfg.get("sliding_window")
    if model_type == "mistral":
        return int(window) if window else None
    if model_type in ("qwen2", "qwen3"):
        layer_types = cfg.get("layer_types")
        if layer_types is not None:
            if any(t != "full_attention" for t in layer_types):
                raise bad("layer_types", f"= {sorted(set(layer_types))}: per-layer sliding-window "
                          "attention is not implemented")
            return None
        if cfg.get("use_sliding_window") and window:
            raise bad("use_sliding_window", "= true: per-layer sliding-window attention is not "
                      "implemented")
        return None
    if window:
        raise bad("sliding_window", f"= {window} is not supported for model_type {model_type!r}")
    return None
