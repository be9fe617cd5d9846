# ruff: noqa: F722  (jaxtyping shape strings are not forward references)
"""BERT-family encoder (BERT, MiniLM) in Flax NNX, plus a strict torch-free loader.

HiLoRA routes each input by Gaussian likelihoods of a sentence embedding; the embedding comes from
a small bidirectional encoder such as all-MiniLM-L6-v2. This module holds that encoder.

Design
------
* **Math in pure functions** (`layer_norm`, `gelu`, `embed_tokens`, `self_attention`, `encoder_layer`,
  ...). They take parameter arrays and activations and nothing else, so they are easy to test and to
  ``jax.jit``. The NNX modules below are thin shells that hold ``nnx.Param``s and call them.
* **HF attribute names.** The module tree mirrors ``transformers.BertModel``
  (``embeddings.word_embeddings``, ``encoder.layer.3.attention.self.query``, ``...output.LayerNorm``),
  so converting a checkpoint is a table of renames and transposes (`_TABLE`). The only renames are
  ``Linear.weight -> Dense.kernel`` (transposed: kernels are ``[in, out]``).
* **HF numerics.** Post-LN layers, query scaling by ``1/sqrt(H)`` on the scores, exact erf GELU for
  ``hidden_act="gelu"`` (tanh approximation for ``gelu_new`` / ``gelu_pytorch_tanh``), two-pass
  LayerNorm variance, absolute learned positions ``0..T-1``.
* **Strict loading** (`load_bert`). Config fields go through an allowlist: fields we read, fields that
  must keep a default value (``position_embedding_type``, ``is_decoder``, ...), and fields known not to
  affect the forward pass. Anything else raises, naming the field. Every tensor in the safetensors
  file(s) is consumed exactly once (or deliberately ignored, e.g. the pooler, which
  sentence-transformers never uses), every parameter is filled exactly once, shapes are checked, and all
  offenders are reported in one error that names the file.

Shape legend (used in einsum strings and comments)::

    B batch   T tokens (queries)   S tokens (keys)   D hidden   F intermediate (mlp)
    N heads   H head dim           V vocab           P positions   Y token types
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------

_ACTIVATIONS: dict[str, bool] = {  # hidden_act -> tanh approximation?
    "gelu": False,  # HF "gelu" is the exact erf form
    "gelu_new": True,
    "gelu_pytorch_tanh": True,
}

# Fields that must keep this value: any other value changes the maths in a way we do not implement.
_REQUIRED_VALUES: dict[str, Any] = {
    "position_embedding_type": "absolute",
    "is_decoder": False,
    "add_cross_attention": False,
    "pruned_heads": {},
    "chunk_size_feed_forward": 0,  # chunking is numerically a no-op in HF, but keep it honest
}

# Fields that do not change the inference forward pass (dropout, training, bookkeeping, generation).
_HARMLESS_FIELDS: frozenset[str] = frozenset(
    {
        "_name_or_path", "architectures", "model_type", "transformers_version", "torch_dtype", "dtype",
        "attention_probs_dropout_prob", "hidden_dropout_prob", "classifier_dropout",
        "initializer_range", "gradient_checkpointing", "use_cache", "return_dict",
        "output_hidden_states", "output_attentions", "torchscript", "tie_word_embeddings",
        "pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "decoder_start_token_id",
        "id2label", "label2id", "problem_type", "finetuning_task", "tokenizer_class", "prefix",
        "task_specific_params", "is_encoder_decoder", "_attn_implementation_autoset",
    }
)  # fmt: skip

_READ_FIELDS: frozenset[str] = frozenset(
    {
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
        "hidden_act", "max_position_embeddings", "type_vocab_size", "layer_norm_eps",
    }
)  # fmt: skip


@dataclass(frozen=True)
class BertConfig:
    """Hyper-parameters of a BERT-family encoder (hashable: usable as a static jit argument)."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int = 2
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12

    def __post_init__(self) -> None:
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(
                f"config field 'hidden_act'={self.hidden_act!r} is not supported "
                f"(supported: {sorted(_ACTIVATIONS)})"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any], *, source: str = "config.json") -> BertConfig:
        """Build from a HF ``config.json`` dict through the field allowlist.

        Raises ``ValueError`` naming every offending field (unsupported value or unknown field).
        """
        errors: list[str] = []
        if cfg.get("model_type", "bert") != "bert":
            errors.append(f"'model_type'={cfg.get('model_type')!r} (only 'bert' is implemented)")
        for key, want in _REQUIRED_VALUES.items():
            if key in cfg and cfg[key] not in (want, None):
                errors.append(f"{key!r}={cfg[key]!r} (only {want!r} is implemented)")
        if cfg.get("hidden_act", "gelu") not in _ACTIVATIONS:
            errors.append(f"'hidden_act'={cfg['hidden_act']!r} (supported: {sorted(_ACTIVATIONS)})")
        known = _READ_FIELDS | _HARMLESS_FIELDS | set(_REQUIRED_VALUES)
        unknown = sorted(k for k in cfg if k not in known)
        errors += [
            f"{k!r} is not a field this loader knows (it may change the maths)" for k in unknown
        ]
        missing = sorted(k for k in ("vocab_size", "hidden_size", "num_hidden_layers",
                                     "num_attention_heads", "intermediate_size",
                                     "max_position_embeddings") if k not in cfg)  # fmt: skip
        errors += [f"required field {k!r} is missing" for k in missing]
        if errors:
            raise ValueError(f"unsupported BERT config in {source}:\n  " + "\n  ".join(errors))
        return cls(
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=int(cfg["hidden_size"]),
            num_hidden_layers=int(cfg["num_hidden_layers"]),
            num_attention_heads=int(cfg["num_attention_heads"]),
            intermediate_size=int(cfg["intermediate_size"]),
            max_position_embeddings=int(cfg["max_position_embeddings"]),
            type_vocab_size=int(cfg.get("type_vocab_size", 2)),
            hidden_act=str(cfg.get("hidden_act", "gelu")),
            layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-12)),
        )


# --------------------------------------------------------------------------------------------------
# Pure math
# --------------------------------------------------------------------------------------------------


def layer_norm(
    x: Float[Array, "*B D"], weight: Float[Array, " D"], bias: Float[Array, " D"], eps: float
) -> Float[Array, "*B D"]:
    """LayerNorm over the last axis with two-pass (biased) variance, as ``torch.nn.LayerNorm``."""
    mean = jnp.mean(x, axis=-1, keepdims=True)
    centered = x - mean
    var = jnp.mean(centered * centered, axis=-1, keepdims=True)
    return centered * jax.lax.rsqrt(var + eps) * weight + bias


def gelu(x: Float[Array, "*X"], hidden_act: str) -> Float[Array, "*X"]:
    """HF activation by name: ``gelu`` is exact (erf); ``gelu_new``/``gelu_pytorch_tanh`` use tanh."""
    return jax.nn.gelu(x, approximate=_ACTIVATIONS[hidden_act])


def dense(
    x: Float[Array, "*B I"], kernel: Float[Array, "I O"], bias: Float[Array, " O"]
) -> Float[Array, "*B O"]:
    """Affine map with an ``[in, out]`` kernel."""
    return jnp.einsum("...i,io->...o", x, kernel) + bias


def embed_tokens(
    input_ids: Int[Array, "B T"],
    token_type_ids: Int[Array, "B T"],
    word: Float[Array, "V D"],
    position: Float[Array, "P D"],
    token_type: Float[Array, "Y D"],
) -> Float[Array, "B T D"]:
    """Sum of word, token-type and absolute position embeddings (positions ``0..T-1``), HF order."""
    t = input_ids.shape[1]
    x = jnp.take(word, input_ids, axis=0) + jnp.take(token_type, token_type_ids, axis=0)  # BTD
    return x + position[None, :t]  # BTD


def self_attention(
    x: Float[Array, "B T D"],
    attention_mask: Bool[Array, "B S"],
    q: Float[Array, "B T D"],
    k: Float[Array, "B S D"],
    v: Float[Array, "B S D"],
    num_heads: int,
) -> Float[Array, "B T D"]:
    """Bidirectional multi-head attention over already-projected q/k/v; masked keys get zero weight."""
    b, t, d = x.shape
    h = d // num_heads
    q = q.reshape(b, t, num_heads, h)  # BTNH
    k = k.reshape(b, -1, num_heads, h)  # BSNH
    v = v.reshape(b, -1, num_heads, h)  # BSNH
    scores = jnp.einsum("BTNH,BSNH->BNTS", q, k) / math.sqrt(h)  # BNTS
    scores = jnp.where(attention_mask[:, None, None, :], scores, jnp.finfo(scores.dtype).min)
    probs = jax.nn.softmax(scores, axis=-1)  # BNTS
    out = jnp.einsum("BNTS,BSNH->BTNH", probs, v)  # BTNH
    return out.reshape(b, t, d)


# --------------------------------------------------------------------------------------------------
# Thin NNX shells holding parameters (HF attribute names)
# --------------------------------------------------------------------------------------------------


class Dense(nnx.Module):
    """``torch.nn.Linear`` counterpart; ``kernel`` is ``[in, out]`` (the transpose of HF ``weight``)."""

    def __init__(self, d_in: int, d_out: int, *, rngs: nnx.Rngs):
        self.kernel = nnx.Param(jax.random.normal(rngs.params(), (d_in, d_out), jnp.float32) * 0.02)
        self.bias = nnx.Param(jnp.zeros((d_out,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        return dense(x, self.kernel[...], self.bias[...])


class LayerNorm(nnx.Module):
    """``torch.nn.LayerNorm`` counterpart with HF names ``weight`` / ``bias``."""

    def __init__(self, d: int, eps: float):
        self.weight = nnx.Param(jnp.ones((d,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((d,), jnp.float32))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return layer_norm(x, self.weight[...], self.bias[...], self.eps)


class Embedding(nnx.Module):
    """``torch.nn.Embedding`` counterpart: a ``weight`` table ``[rows, D]``."""

    def __init__(self, rows: int, d: int, *, rngs: nnx.Rngs):
        self.weight = nnx.Param(jax.random.normal(rngs.params(), (rows, d), jnp.float32) * 0.02)


class BertEmbeddings(nnx.Module):
    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.word_embeddings = Embedding(cfg.vocab_size, cfg.hidden_size, rngs=rngs)
        self.position_embeddings = Embedding(
            cfg.max_position_embeddings, cfg.hidden_size, rngs=rngs
        )
        self.token_type_embeddings = Embedding(cfg.type_vocab_size, cfg.hidden_size, rngs=rngs)
        self.LayerNorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)

    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array) -> jax.Array:
        x = embed_tokens(
            input_ids,
            token_type_ids,
            self.word_embeddings.weight[...],
            self.position_embeddings.weight[...],
            self.token_type_embeddings.weight[...],
        )
        return self.LayerNorm(x)


class BertSelfAttention(nnx.Module):
    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.query = Dense(cfg.hidden_size, cfg.hidden_size, rngs=rngs)
        self.key = Dense(cfg.hidden_size, cfg.hidden_size, rngs=rngs)
        self.value = Dense(cfg.hidden_size, cfg.hidden_size, rngs=rngs)
        self.num_heads = cfg.num_attention_heads

    def __call__(self, x: jax.Array, attention_mask: jax.Array) -> jax.Array:
        return self_attention(
            x, attention_mask, self.query(x), self.key(x), self.value(x), self.num_heads
        )


class BertSelfOutput(nnx.Module):
    """Output projection + residual + post-LN (HF ``attention.output``)."""

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.dense = Dense(cfg.hidden_size, cfg.hidden_size, rngs=rngs)
        self.LayerNorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)

    def __call__(self, h: jax.Array, residual: jax.Array) -> jax.Array:
        return self.LayerNorm(self.dense(h) + residual)


class BertAttention(nnx.Module):
    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        # HF names the inner block ``self``; keeping it makes the mapping a pure rename.
        self.self = BertSelfAttention(cfg, rngs=rngs)
        self.output = BertSelfOutput(cfg, rngs=rngs)

    def __call__(self, x: jax.Array, attention_mask: jax.Array) -> jax.Array:
        return self.output(self.self(x, attention_mask), x)


class BertIntermediate(nnx.Module):
    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.dense = Dense(cfg.hidden_size, cfg.intermediate_size, rngs=rngs)
        self.hidden_act = cfg.hidden_act

    def __call__(self, x: jax.Array) -> jax.Array:
        return gelu(self.dense(x), self.hidden_act)  # BTF


class BertOutput(nnx.Module):
    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.dense = Dense(cfg.intermediate_size, cfg.hidden_size, rngs=rngs)
        self.LayerNorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)

    def __call__(self, h: jax.Array, residual: jax.Array) -> jax.Array:
        return self.LayerNorm(self.dense(h) + residual)


class BertLayer(nnx.Module):
    """Post-LN block: ``x = LN(x + Attn(x)); x = LN(x + W2 gelu(W1 x))``."""

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.attention = BertAttention(cfg, rngs=rngs)
        self.intermediate = BertIntermediate(cfg, rngs=rngs)
        self.output = BertOutput(cfg, rngs=rngs)

    def __call__(self, x: jax.Array, attention_mask: jax.Array) -> jax.Array:
        x = self.attention(x, attention_mask)  # BTD
        return self.output(self.intermediate(x), x)  # BTD


class BertEncoder(nnx.Module):
    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.layer = nnx.List([BertLayer(cfg, rngs=rngs) for _ in range(cfg.num_hidden_layers)])

    def __call__(self, x: jax.Array, attention_mask: jax.Array) -> jax.Array:
        for layer in self.layer:
            x = layer(x, attention_mask)
        return x


class BertModel(nnx.Module):
    """Encoder returning the last hidden state ``[B, T, D]`` (no pooler: see module docstring)."""

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.embeddings = BertEmbeddings(cfg, rngs=rngs)
        self.encoder = BertEncoder(cfg, rngs=rngs)

    def __call__(
        self,
        input_ids: Int[Array, "B T"],
        attention_mask: Int[Array, "B T"] | Bool[Array, "B T"],
        token_type_ids: Int[Array, "B T"] | None = None,
    ) -> Float[Array, "B T D"]:
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence length {input_ids.shape[1]} exceeds max_position_embeddings="
                f"{self.config.max_position_embeddings}"
            )
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = self.embeddings(input_ids, token_type_ids)  # BTD
        return self.encoder(x, attention_mask.astype(bool))


# --------------------------------------------------------------------------------------------------
# Strict loader: HF directory (config.json + safetensors) -> BertModel
# --------------------------------------------------------------------------------------------------


def _identity(a: np.ndarray) -> np.ndarray:
    return a


def _transpose(a: np.ndarray) -> np.ndarray:
    return a.T  # torch Linear weight [out, in] -> kernel [in, out]


_L = r"encoder\.layer\.(\d+)\."
# HF key pattern -> (our dotted path template, transform). Every source key must match exactly one row.
_TABLE: tuple[tuple[str, str, Callable[[np.ndarray], np.ndarray]], ...] = (
    (r"embeddings\.(word|position|token_type)_embeddings\.weight", r"embeddings.\1_embeddings.weight", _identity),
    (r"embeddings\.LayerNorm\.(weight|bias)", r"embeddings.LayerNorm.\1", _identity),
    (_L + r"attention\.self\.(query|key|value)\.weight", r"encoder.layer.\1.attention.self.\2.kernel", _transpose),
    (_L + r"attention\.self\.(query|key|value)\.bias", r"encoder.layer.\1.attention.self.\2.bias", _identity),
    (_L + r"(attention\.output|intermediate|output)\.dense\.weight", r"encoder.layer.\1.\2.dense.kernel", _transpose),
    (_L + r"(attention\.output|intermediate|output)\.dense\.bias", r"encoder.layer.\1.\2.dense.bias", _identity),
    (_L + r"(attention\.output|output)\.LayerNorm\.(weight|bias)", r"encoder.layer.\1.\2.LayerNorm.\3", _identity),
)  # fmt: skip

# Source keys consumed on purpose without a target, with the reason.
_IGNORED: tuple[tuple[str, str], ...] = (
    (
        r"pooler\.dense\.(weight|bias)",
        "BERT pooler: sentence-transformers pools token embeddings itself",
    ),
    (r"embeddings\.position_ids", "buffer: positions are always arange(T)"),
    (r"embeddings\.token_type_ids", "buffer: token types are passed explicitly"),
)


def _path_str(path: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in path)


def _safetensors_files(model_dir: Path) -> list[Path]:
    single = model_dir / "model.safetensors"
    index = model_dir / "model.safetensors.index.json"
    if single.exists():
        return [single]
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / s for s in shards]
    raise FileNotFoundError(
        f"no model.safetensors (or model.safetensors.index.json) in {model_dir}; this loader is "
        "torch-free and reads safetensors only"
    )


def load_bert(model_dir: str | Path) -> BertModel:
    """Load a HF BERT-family encoder directory strictly (see module docstring).

    Raises ``ValueError`` listing every unknown, missing, duplicated or mis-shaped tensor, naming the file.
    """
    from safetensors.numpy import load_file  # local import: only the loader needs it

    model_dir = Path(model_dir)
    cfg_path = model_dir / "config.json"
    cfg = BertConfig.from_hf_config(json.loads(cfg_path.read_text()), source=str(cfg_path))

    abstract = nnx.eval_shape(lambda: BertModel(cfg, rngs=nnx.Rngs(0)))
    graphdef, abs_state = nnx.split(abstract)
    targets: dict[str, tuple[tuple[Any, ...], tuple[int, ...]]] = {
        _path_str(p): (p, tuple(v.shape)) for p, v in nnx.to_flat_state(abs_state)
    }

    filled: dict[str, np.ndarray] = {}
    filled_from: dict[str, str] = {}
    unknown: list[str] = []
    duplicated: list[str] = []
    bad_shape: list[str] = []
    files = _safetensors_files(model_dir)
    for file in files:
        for key, tensor in load_file(str(file)).items():
            where = f"{key} ({file.name})"
            if any(re.fullmatch(pat, key) for pat, _ in _IGNORED):
                continue
            rows = [(pat, tgt, fn) for pat, tgt, fn in _TABLE if re.fullmatch(pat, key)]
            if len(rows) != 1:
                unknown.append(where)
                continue
            pat, tgt, fn = rows[0]
            target = re.sub(pat, tgt, key)
            if target not in targets:  # e.g. encoder.layer.7 in a 6-layer config
                unknown.append(where)
                continue
            if target in filled:
                duplicated.append(
                    f"{where} -> {target} (already filled from {filled_from[target]})"
                )
                continue
            value = np.asarray(fn(tensor), dtype=np.float32)
            want = targets[target][1]
            if value.shape != want:
                bad_shape.append(
                    f"{where}: got {tuple(tensor.shape)}, {target} expects {want} after transform"
                )
                continue
            filled[target] = value
            filled_from[target] = where
    missing = sorted(t for t in targets if t not in filled)

    problems = []
    for title, items in (
        ("unknown tensors", unknown),
        ("duplicated tensors", duplicated),
        ("wrong shapes", bad_shape),
        ("parameters with no tensor", missing),
    ):
        if items:
            problems.append(f"{title} ({len(items)}):\n    " + "\n    ".join(items))
    if problems:
        raise ValueError(
            f"checkpoint {', '.join(str(f) for f in files)} does not match BertModel({cfg}):\n  "
            + "\n  ".join(problems)
        )

    pure: dict[Any, Any] = {}
    for name, arr in filled.items():
        node = pure
        path = targets[name][0]
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = jnp.asarray(arr)
    nnx.replace_by_pure_dict(abs_state, pure)
    return nnx.merge(graphdef, abs_state)
