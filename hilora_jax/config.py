"""Model configuration: one frozen dataclass for the Llama family, read strictly from HF configs.

`ModelConfig.from_hf_config` reads both the transformers 4.x layout (`rope_theta`, `rope_scaling`,
`torch_dtype`) and the 5.x layout (`rope_parameters`, `dtype`, `layer_types`). Every field of the HF
config falls in exactly one of three sets:

* handled: it changes the maths and we implement it (e.g. `num_key_value_heads`, `rope_scaling`);
* ignored: it does not change inference maths (e.g. `initializer_range`, `use_cache`, label maps);
* value-checked: allowed only at values that keep the maths we implement (e.g. `pretraining_tp == 1`,
  `hidden_act == "silu"`, `rope_interleaved == False`).

Anything else raises `UnsupportedConfigError` naming the field, so a checkpoint whose architecture
differs in a way we do not implement can never load silently with wrong results (penzai's habit).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np


class UnsupportedConfigError(ValueError):
    """A config field (or value) would change the model's maths in a way we do not implement."""


SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

# Fields that do not change inference maths.
_IGNORED = {
    "architectures", "transformers_version", "torch_dtype", "dtype", "initializer_range",
    "use_cache", "attention_dropout", "output_hidden_states", "output_attentions", "return_dict",
    "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id", "problem_type",
    "_name_or_path", "name_or_path", "tokenizer_class", "prefix", "task_specific_params",
    "is_llama_config", "transformers.js_config", "pad_token_id", "bos_token_id", "eos_token_id",
    "sep_token_id", "decoder_start_token_id", "tie_encoder_decoder", "torchscript", "_commit_hash",
    "_attn_implementation_autoset", "max_window_layers", "finetuning_task", "quantization_config",
    "model_type", "layer_types", "use_sliding_window", "sliding_window", "rope_parameters",
    "rope_theta", "rope_scaling", "head_dim", "vocab_size", "hidden_size", "intermediate_size",
    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "rms_norm_eps",
    "max_position_embeddings", "tie_word_embeddings", "attention_bias", "mlp_bias",
    "pretraining_tp", "hidden_act", "rope_interleaved", "use_bfloat16", "embd_pdrop",
    "resid_pdrop", "bad_words_ids", "begin_suppress_tokens", "forced_bos_token_id",
    "forced_eos_token_id", "suppress_tokens", "cross_attention_hidden_size", "add_cross_attention",
    "is_decoder", "pruned_heads", "tf_legacy_loss", "output_scores", "return_dict_in_generate",
    "remove_invalid_values", "exponential_decay_length_penalty", "typical_p", "top_k", "top_p",
    "temperature", "do_sample", "num_beams", "num_beam_groups", "diversity_penalty",
    "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
    "min_length", "max_length", "early_stopping", "num_return_sequences", "bad_words",
    "tie_word_embeddings_", "use_return_dict", "auto_map", "_auto_class", "custom_pipelines",
}
_SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


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
        """`(d_in, d_out)` of every adaptable projection, by HF module name."""
        d, f = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (d, self.q_size), "k_proj": (d, self.kv_size), "v_proj": (d, self.kv_size),
            "o_proj": (self.q_size, d), "gate_proj": (d, f), "up_proj": (d, f),
            "down_proj": (f, d),
        }

    # -- HF interop -------------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any] | Any, *, source: str = "config") -> ModelConfig:
        """Build from a HF config (dict, `PretrainedConfig`, or path to `config.json`).

        Raises `UnsupportedConfigError` naming any field outside the allowlist or any value that
        would change the maths in a way not implemented.
        """
        if isinstance(cfg, (str, Path)):
            source = str(cfg)
            cfg = json.loads(Path(cfg).read_text())
        elif not isinstance(cfg, Mapping):
            cfg = cfg.to_dict()
        cfg = dict(cfg)

        def bad(field: str, why: str) -> UnsupportedConfigError:
            return UnsupportedConfigError(f"{source}: field {field!r} {why}")

        mt = cfg.get("model_type", "llama")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise bad("model_type", f"= {mt!r} is not supported (supported: {SUPPORTED_MODEL_TYPES})")
        unknown = sorted(k for k in cfg if k not in _IGNORED)
        if unknown:
            raise bad(unknown[0], f"is not handled by hilora-jax (all unhandled fields: {unknown}); "
                      "it may change the model's maths")
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise bad("hidden_act", f"= {act!r}: only 'silu' is implemented")
        if cfg.get("pretraining_tp", 1) not in (1, None):
            raise bad("pretraining_tp", f"= {cfg['pretraining_tp']}: only 1 is implemented")
        if cfg.get("rope_interleaved", False):
            raise bad("rope_interleaved", "= true: only rotate-half RoPE is implemented")
        if cfg.get("is_decoder") is False or cfg.get("add_cross_attention"):
            raise bad("add_cross_attention", "is not supported for a decoder-only model")

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
