"""T5 / FLAN-T5 configuration, read strictly from a HF `config.json` (transformers 4.x and 5.x).

The field policy is the Llama one (`hilora_jax.model.config`): a field is *read* (and validated),
*value-checked* (allowed only at values that keep the maths we implement), *metadata* (cannot
touch the forward maths), or *unknown* (accepted with one `UnknownFieldWarning` line when unset,
refused naming the field and value otherwise). Errors are `UnsupportedConfigError`, one line
naming the file, the field and the value.

The two T5 variants differ in three places, all read from the config:

* feed-forward: `feed_forward_proj` is `"{act}"` (T5 v1.0: `"relu"`, `wi` then `wo`) or
  `"gated-{act}"` (v1.1 / FLAN-T5: `"gated-gelu"`, `act(wi_0) * wi_1` then `wo`); transformers maps
  `"gated-gelu"` to the tanh-approximated `gelu_new`. A stored `dense_act_fn` / `is_gated_act`
  overrides the derived value, exactly as transformers does when it reads the file;
* output scaling: v1.0 scales the decoder output by `d_model ** -0.5` before the (tied) head.
  transformers 4.x derives it from `tie_word_embeddings` (default true); 5.x stores
  `scale_decoder_outputs` (and always writes `tie_word_embeddings: true`);
* head: v1.0 ties `lm_head` to `shared`; v1.1 has its own `lm_head.weight`. A 4.x config says so
  with `tie_word_embeddings: false`; a 5.x config cannot, so the loader (`hilora_jax.t5.load`)
  unties the head when the checkpoint carries an `lm_head.weight` that differs from `shared.weight`
  (transformers 5 does the same).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hilora_jax.model.config import (
    _METADATA,
    UnsupportedConfigError,
    _short_repr,
    check_positive_ints,
    read_config_mapping,
    screen_fields,
    unknown_fields_warning,
)

SUPPORTED_MODEL_TYPES = ("t5",)
# `T5WithLMHeadModel` is the pre-4.0 name of the same class (old t5-small/base configs).
ARCHITECTURES = ("T5ForConditionalGeneration", "T5WithLMHeadModel")
# Activations of the feed-forward block, by transformers' ACT2FN name.
ACTIVATIONS = ("relu", "gelu", "gelu_new", "gelu_pytorch_tanh", "silu", "swish")

_OTHER_T5_LIKE = {
    "mt5": "mT5 (use model_type 't5' tooling once mT5 is added; not implemented yet)",
    "umt5": "UMT5 (a relative position bias in every layer is not implemented)",
    "longt5": "LongT5 (local / transient-global attention is not implemented)",
    "switch_transformers": "Switch Transformers (mixture-of-experts MLPs are not implemented)",
    "bart": "BART (learned positions, biases and LayerNorm are not implemented)",
    "mbart": "mBART (learned positions, biases and LayerNorm are not implemented)",
    "pegasus": "Pegasus (sinusoidal positions and LayerNorm are not implemented)",
    "llama": "a decoder-only model: load it with hilora_jax.io.loading.load_model",
    "mistral": "a decoder-only model: load it with hilora_jax.io.loading.load_model",
    "qwen2": "a decoder-only model: load it with hilora_jax.io.loading.load_model",
    "qwen3": "a decoder-only model: load it with hilora_jax.io.loading.load_model",
}

_READ = {
    "model_type", "architectures", "vocab_size", "d_model", "d_kv", "d_ff", "num_layers",
    "num_decoder_layers", "num_heads", "relative_attention_num_buckets",
    "relative_attention_max_distance", "layer_norm_epsilon", "feed_forward_proj", "dense_act_fn",
    "is_gated_act", "tie_word_embeddings", "scale_decoder_outputs", "pad_token_id", "eos_token_id",
    "bos_token_id", "decoder_start_token_id",
}
_VALUE_CHECKED: dict[str, tuple[Any, str]] = {
    "is_encoder_decoder": (lambda v: v in (True, None), "T5ForConditionalGeneration is an "
                           "encoder-decoder; an encoder-only / decoder-only T5 is not implemented"),
    "quantization_config": (lambda v: not v, "quantized checkpoints are not supported; use a "
                            "dequantized (fp32/bf16/fp16) checkpoint"),
    "pruned_heads": (lambda v: not v, "pruned attention heads are not implemented"),
    "auto_map": (lambda v: not any(str(k).startswith("AutoModel") for k in (v or {})),
                 "the model's maths is in custom remote code"),
    "add_cross_attention": (lambda v: not v, "an extra cross-attention block is not implemented"),
}
_T5_METADATA = {
    # never read by transformers' T5 modelling code
    "n_positions", "output_past", "dropout_rate", "classifier_dropout", "feed_forward_dropout",
    "num_labels",
}
_INTS = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads",
         "relative_attention_num_buckets", "relative_attention_max_distance")


@dataclasses.dataclass(frozen=True)
class T5Config:
    """T5 v1.0 / v1.1 / FLAN-T5 encoder-decoder (`T5ForConditionalGeneration`)."""

    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int  # encoder blocks
    num_decoder_layers: int
    num_heads: int
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    dense_act_fn: str = "relu"
    is_gated_act: bool = False
    tie_word_embeddings: bool = True  # lm_head is `shared` (v1.0); False: own lm_head (v1.1)
    scale_decoder_outputs: bool = True  # decoder output * d_model**-0.5 before the head (v1.0)
    pad_token_id: int | None = 0
    eos_token_id: tuple[int, ...] = (1,)
    decoder_start_token_id: int = 0
    model_type: str = "t5"

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv

    def projections(self):
        """The adaptable projection rows of this config (`hilora_jax.t5.projections`)."""
        from hilora_jax.t5.projections import projections

        return projections(self)

    @property
    def variant(self) -> str:
        return "v1.1" if self.is_gated_act else "v1.0"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> T5Config:
        d = dict(d)
        d["eos_token_id"] = tuple(d.get("eos_token_id") or ())
        return cls(**d)

    # -- HF interop -------------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any] | Any, *, source: str = "config") -> T5Config:
        """Build from a HF T5 config (dict, `PretrainedConfig`, or path to `config.json`).

        Raises `UnsupportedConfigError` (one line: file, field, value, reason) for another
        architecture, an unknown field with a value, or a known field at a value whose maths is
        not implemented; warns once (`UnknownFieldWarning`) about unset unknown fields.
        """
        cfg, source = read_config_mapping(cfg, source)

        def bad(field: str, why: str) -> UnsupportedConfigError:
            return UnsupportedConfigError(f"{source}: field {field!r} {why}")

        mt = cfg.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            why = _OTHER_T5_LIKE.get(mt, "an architecture the T5 runtime does not implement")
            raise bad("model_type", f"= {mt!r}: {why} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        archs = cfg.get("architectures") or []
        if not isinstance(archs, list) or any(a not in ARCHITECTURES for a in archs):
            raise bad("architectures", f"= {archs!r}: only {' / '.join(ARCHITECTURES)} (encoder, "
                      "decoder and LM head) is implemented for model_type 't5'")
        unset_unknown = screen_fields(
            cfg, bad, known=lambda k: k in _READ or k in _METADATA or k in _T5_METADATA,
            value_checked=_VALUE_CHECKED)
        for k in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads"):
            if k not in cfg:
                raise bad(k, "is required and missing")
        check_positive_ints(cfg, bad, _INTS)
        eps = cfg.get("layer_norm_epsilon", 1e-6)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise bad("layer_norm_epsilon", f"= {eps!r} must be a positive number")
        act, gated = _read_feed_forward(cfg, bad)
        for k in ("tie_word_embeddings", "scale_decoder_outputs"):
            if k in cfg and not isinstance(cfg[k], bool):
                raise bad(k, f"= {cfg[k]!r} must be true or false")
        unknown_fields_warning(source, unset_unknown)

        tie = cfg.get("tie_word_embeddings")
        # transformers 5.x stores the scaling; 4.x derives it from tie_word_embeddings (default on)
        scale = cfg["scale_decoder_outputs"] if "scale_decoder_outputs" in cfg else tie is not False
        eos = cfg.get("eos_token_id", 1)
        eos = tuple(int(e) for e in eos) if isinstance(eos, (list, tuple)) else (
            () if eos is None else (int(eos),))
        start = cfg.get("decoder_start_token_id")
        pad = cfg.get("pad_token_id", 0)
        if start is None:
            start = pad if pad is not None else 0
        return cls(
            vocab_size=int(cfg["vocab_size"]),
            d_model=int(cfg["d_model"]),
            d_kv=int(cfg["d_kv"]),
            d_ff=int(cfg["d_ff"]),
            num_layers=int(cfg["num_layers"]),
            num_decoder_layers=int(cfg.get("num_decoder_layers") or cfg["num_layers"]),
            num_heads=int(cfg["num_heads"]),
            relative_attention_num_buckets=int(cfg.get("relative_attention_num_buckets", 32)),
            relative_attention_max_distance=int(cfg.get("relative_attention_max_distance", 128)),
            layer_norm_epsilon=float(eps),
            dense_act_fn=act,
            is_gated_act=gated,
            tie_word_embeddings=tie is not False,
            scale_decoder_outputs=bool(scale),
            pad_token_id=pad,
            eos_token_id=eos,
            decoder_start_token_id=int(start),
        )


def _read_feed_forward(cfg: dict, bad) -> tuple[str, bool]:
    """`(activation, gated)` as transformers derives them (stored fields win, as when it loads)."""
    ffp = cfg.get("feed_forward_proj", "relu")
    parts = ffp.split("-") if isinstance(ffp, str) else None
    if not parts or len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
        raise bad("feed_forward_proj", f"= {ffp!r} is not of the form '{{act}}' or 'gated-{{act}}' "
                  f"(e.g. 'relu', 'gated-gelu')")
    act, gated = parts[-1], parts[0] == "gated"
    if ffp == "gated-gelu":
        act = "gelu_new"  # transformers: "gated-gelu" means the tanh approximation
    if "dense_act_fn" in cfg:
        act = cfg["dense_act_fn"]
        if act not in ACTIVATIONS:
            raise bad("dense_act_fn", f"= {_short_repr(act)}: activation not implemented "
                      f"(supported: {', '.join(ACTIVATIONS)})")
    elif act not in ACTIVATIONS:
        raise bad("feed_forward_proj", f"= {ffp!r}: activation {act!r} not implemented "
                  f"(supported: {', '.join(ACTIVATIONS)}, optionally with 'gated-')")
    if "is_gated_act" in cfg:
        if not isinstance(cfg["is_gated_act"], bool):
            raise bad("is_gated_act", f"= {cfg['is_gated_act']!r} must be true or false")
        gated = cfg["is_gated_act"]
    return act, gated


def read_t5_config(model_dir: str | Path) -> T5Config:
    """`T5Config` of a HF model directory (its `config.json`)."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise UnsupportedConfigError(f"{model_dir}: no config.json")
    return T5Config.from_hf_config(path)


def is_t5_dir(src: str | Path) -> bool:
    """Whether `src` is a local HF directory whose `config.json` says `model_type: t5` (anything
    else, a hub id, a missing or unreadable config included, is not). How the CLI, the trainer
    and the lm-eval backend pick the T5 path."""
    cfg = Path(src) / "config.json"
    try:
        return json.loads(cfg.read_text()).get("model_type") == "t5"
    except (OSError, ValueError, AttributeError):
        return False
