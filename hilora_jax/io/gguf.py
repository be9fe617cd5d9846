"""Torch-free reader for Llama-architecture GGUF files (llama.cpp's format).

Design
------
The rest of the io layer consumes one thing: a **HF-style state dict** (names exactly as
``transformers.LlamaForCausalLM.state_dict()``, numpy arrays in torch layout ``[out, in]``) plus a
HF ``config.json``-style dict. This module turns a GGUF file into exactly that, so the HF and GGUF
loaders share everything after this point. Only ``numpy`` and the ``gguf`` package are used; torch
is never imported (transformers is imported lazily, and only by :func:`load_gguf_tokenizer`).

What llama.cpp's ``convert_hf_to_gguf.py`` does to a Llama checkpoint, and how it is undone here:

1. **Names.** ``model.layers.N.self_attn.q_proj.weight`` becomes ``blk.N.attn_q.weight`` and so
   on. :data:`_TENSOR_PATTERNS` is the one mapping table (GGUF pattern -> HF name); a tensor that
   matches no row, or a layer index outside ``block_count``, is an error.
2. **Shapes.** GGUF lists dimensions fastest-varying first, i.e. reversed with respect to numpy /
   torch; a ``[out, in]`` torch weight is recorded as ``(in, out)``. The data itself is row-major
   ``[out, in]``, so dequantising and reshaping to the reversed recorded shape restores the torch
   layout without any transpose. Every tensor's shape is then checked against the config.
3. **Q/K row permutation.** HF Llama applies RoPE with "rotate half" (the two halves of each head
   are the pair), llama.cpp with interleaved pairs. The converter therefore permutes the rows of
   ``q_proj`` (with ``num_attention_heads``) and ``k_proj`` (with ``num_key_value_heads``):
   ``w.reshape(n, 2, h // 2, in).swapaxes(1, 2)``. :func:`_unpermute_qk` applies the inverse, the
   same one transformers' ``LlamaTensorProcessor._reverse_permute_weights`` uses.
4. **Tied embeddings.** When the checkpoint ties ``lm_head`` to the embedding, no ``output.weight``
   is written; its absence is what sets ``tie_word_embeddings=True`` (and no ``lm_head.weight``
   is returned).
5. **Quantisation.** Block-quantised tensors (Q8_0, Q4_0, Q4_1, K-quants, ...) are dequantised to
   float32 by ``gguf.quants.dequantize`` *before* the row permutation (blocks run along the input
   dimension, so a row permutation commutes with dequantisation), then cast to the requested
   dtype.

Strictness follows the project's conversion rules: every ``llama.*`` metadata key is either
handled, explicitly known to be harmless, or an error naming it (a key such as ``expert_count``
changes the maths); every GGUF tensor is consumed exactly once and every expected HF tensor is
produced exactly once, with all offenders listed in one error; every error names the file.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hilora_jax.errors import HiloraUserError

__all__ = ["GGUFError", "GGUFModel", "read_gguf", "read_gguf_metadata", "load_gguf_tokenizer"]

_ARCH = "llama"


class GGUFError(HiloraUserError, ValueError):
    """A GGUF file that cannot be read as a Llama checkpoint; the message names the file."""


@dataclass(frozen=True)
class GGUFModel:
    """A Llama GGUF file converted to the HF layout.

    Attributes:
      config: HF ``LlamaConfig``-style dict (``model_type="llama"`` and the fields listed in
        :func:`read_gguf`).
      tensors: ``{hf_name: array}`` in torch layout, e.g. ``model.layers.0.self_attn.q_proj.weight``
        of shape ``[num_attention_heads * head_dim, hidden_size]``; 1-D norm weights ``[hidden]``.
      path: the file read.
      chat_template: the ``tokenizer.chat_template`` string, or ``None`` if the file has none.
    """

    config: dict[str, Any]
    tensors: dict[str, np.ndarray] = field(repr=False)
    path: Path
    chat_template: str | None = None


# ----------------------------------------------------------------------------- mapping table

# GGUF tensor name pattern -> HF state-dict name ("{i}" is the layer index).
_TENSOR_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(p), hf)
    for p, hf in [
        (r"token_embd\.weight", "model.embed_tokens.weight"),
        (r"output_norm\.weight", "model.norm.weight"),
        (r"output\.weight", "lm_head.weight"),
        (r"blk\.(\d+)\.attn_norm\.weight", "model.layers.{i}.input_layernorm.weight"),
        (r"blk\.(\d+)\.ffn_norm\.weight", "model.layers.{i}.post_attention_layernorm.weight"),
        (r"blk\.(\d+)\.attn_q\.weight", "model.layers.{i}.self_attn.q_proj.weight"),
        (r"blk\.(\d+)\.attn_k\.weight", "model.layers.{i}.self_attn.k_proj.weight"),
        (r"blk\.(\d+)\.attn_v\.weight", "model.layers.{i}.self_attn.v_proj.weight"),
        (r"blk\.(\d+)\.attn_output\.weight", "model.layers.{i}.self_attn.o_proj.weight"),
        (r"blk\.(\d+)\.ffn_gate\.weight", "model.layers.{i}.mlp.gate_proj.weight"),
        (r"blk\.(\d+)\.ffn_up\.weight", "model.layers.{i}.mlp.up_proj.weight"),
        (r"blk\.(\d+)\.ffn_down\.weight", "model.layers.{i}.mlp.down_proj.weight"),
    ]
)

# Tensors llama.cpp writes for features this reader does not implement, with the reason.
_KNOWN_UNSUPPORTED_TENSORS = {
    "rope_freqs.weight": "llama3-style RoPE scaling (rope_freqs) is not supported: the GGUF keeps "
    "only the per-frequency factors, not the HF rope_scaling parameters",
}

# llama.* metadata keys that are read into the config.
_HANDLED_KEYS = {
    "context_length",
    "embedding_length",
    "block_count",
    "feed_forward_length",
    "attention.head_count",
    "attention.head_count_kv",
    "attention.layer_norm_rms_epsilon",
    "attention.key_length",
    "attention.value_length",
    "rope.freq_base",
    "rope.dimension_count",
    "rope.scaling.type",
    "rope.scaling.factor",
    "vocab_size",
}
# llama.* keys that carry no maths for the forward pass (informational only).
_HARMLESS_KEYS = {"rope.scaling.finetuned", "rope.scaling.original_context_length"}
# llama.* keys that are harmless only at this value (MoE disabled).
_HARMLESS_IF_ZERO = {"expert_count", "expert_used_count"}


_VOCAB_ARRAYS = {f"tokenizer.ggml.{k}" for k in ("tokens", "scores", "token_type", "merges")}


# ----------------------------------------------------------------------------- helpers


def _field_value(f: Any) -> Any:
    """A ``gguf.ReaderField``'s value as plain Python (str, int, float, bool or list)."""
    value = f.contents()
    if isinstance(value, np.generic):
        value = value.item()
    return value


def _open(path: Path):
    import gguf

    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        return gguf.GGUFReader(path)
    except Exception as exc:  # the gguf package raises bare ValueError/IndexError on bad bytes
        raise GGUFError(
            f"{path}: cannot parse as GGUF (truncated or corrupt file?): "
            f"{type(exc).__name__}: {exc}"
        ) from exc


def read_gguf_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """All metadata key/values of a GGUF file as plain Python values (no tensor data is read).

    Large tokenizer arrays (``tokenizer.ggml.tokens`` etc.) are included as lists.
    """
    path = Path(path)
    reader = _open(path)
    try:
        return {k: _field_value(f) for k, f in reader.fields.items()}
    except Exception as exc:
        raise GGUFError(f"{path}: corrupt metadata: {type(exc).__name__}: {exc}") from exc


def _f32(x: Any) -> float:
    """A float32 metadata value as the shortest decimal that round-trips through float32.

    GGUF stores ``1e-5`` as float32 (``9.999999747e-06``); HF configs hold the decimal. Both are
    the same float32, which is the precision the model computes in.
    """
    return float(repr(np.float32(x)).removeprefix("np.float32(").removesuffix(")"))


def _unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's RoPE row permutation of a q/k weight.

    Args:
      w: ``[n_head * head_dim, in]`` rows in llama.cpp's interleaved-pair order.
      n_head: ``num_attention_heads`` for q, ``num_key_value_heads`` for k.

    Returns:
      ``[n_head * head_dim, in]`` rows in HF's rotate-half order.
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"{rows} rows do not split into {n_head} heads of even size")
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute`` (HF rotate-half -> GGUF interleaved); inverse of
    :func:`_unpermute_qk`. Exposed for writing test fixtures the way the converter does."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _build_config(path: Path, meta: dict[str, Any], tensor_names: set[str]) -> dict[str, Any]:
    """HF LlamaConfig dict from GGUF metadata; raises on anything unhandled."""
    arch = meta.get("general.architecture")
    if arch != _ARCH:
        raise GGUFError(
            f"{path}: architecture {arch!r} is not supported (this reader handles only {_ARCH!r})"
        )

    prefix = f"{_ARCH}."
    unhandled = []
    for key, value in meta.items():
        if not key.startswith(prefix):
            continue
        sub = key[len(prefix) :]
        if sub in _HANDLED_KEYS or sub in _HARMLESS_KEYS:
            continue
        if sub in _HARMLESS_IF_ZERO and value == 0:
            continue
        unhandled.append(f"{key}={value!r}")
    if unhandled:
        raise GGUFError(
            f"{path}: unhandled GGUF metadata that may change the model's maths: "
            + ", ".join(unhandled)
        )

    def req(sub: str) -> Any:
        key = prefix + sub
        if key not in meta:
            raise GGUFError(f"{path}: required metadata key {key!r} is missing")
        return meta[key]

    def req_int(sub: str) -> int:
        v = req(sub)
        if not isinstance(v, int) or isinstance(v, bool):
            raise GGUFError(
                f"{path}: metadata {prefix + sub!r} must be a single integer, got {v!r}"
                " (per-layer values are not supported)"
            )
        return v

    hidden = req_int("embedding_length")
    n_heads = req_int("attention.head_count")
    n_kv = (
        req_int("attention.head_count_kv")
        if prefix + "attention.head_count_kv" in meta
        else n_heads
    )
    if n_heads % n_kv:
        raise GGUFError(f"{path}: head_count {n_heads} is not a multiple of head_count_kv {n_kv}")
    key_len = meta.get(prefix + "attention.key_length")
    val_len = meta.get(prefix + "attention.value_length")
    if key_len is not None and val_len is not None and key_len != val_len:
        raise GGUFError(
            f"{path}: attention.key_length={key_len} != attention.value_length={val_len} "
            "(not representable in LlamaConfig)"
        )
    head_dim = (
        key_len if key_len is not None else (val_len if val_len is not None else hidden // n_heads)
    )
    if head_dim % 2:
        raise GGUFError(f"{path}: head_dim={head_dim} is odd; RoPE needs an even head_dim")
    rot = meta.get(prefix + "rope.dimension_count", head_dim)
    if rot != head_dim:
        raise GGUFError(
            f"{path}: rope.dimension_count={rot} != head_dim={head_dim}; partial rotary "
            "embeddings are not supported by Llama"
        )

    rope_scaling = None
    rtype = meta.get(prefix + "rope.scaling.type")
    if rtype not in (None, "none"):
        if rtype != "linear":
            raise GGUFError(
                f"{path}: rope scaling type {rtype!r} ({prefix}rope.scaling.type) is not supported; "
                "only 'linear' is"
            )
        rope_scaling = {"rope_type": "linear", "factor": _f32(req("rope.scaling.factor"))}
    elif prefix + "rope.scaling.factor" in meta and rtype is None:
        raise GGUFError(f"{path}: {prefix}rope.scaling.factor is set without rope.scaling.type")

    if "token_embd.weight" not in tensor_names:
        raise GGUFError(f"{path}: tensor 'token_embd.weight' is missing")

    config: dict[str, Any] = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "intermediate_size": req_int("feed_forward_length"),
        "num_hidden_layers": req_int("block_count"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": int(head_dim),
        "rms_norm_eps": _f32(req("attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(meta.get(prefix + "rope.freq_base", 10000.0)),
        "rope_scaling": rope_scaling,
        "max_position_embeddings": req_int("context_length"),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
    }
    # vocab_size: the metadata key if present (newer converters), else filled from token_embd.
    if prefix + "vocab_size" in meta:
        config["vocab_size"] = req_int("vocab_size")
    for hf_key, gguf_key in [
        ("bos_token_id", "tokenizer.ggml.bos_token_id"),
        ("eos_token_id", "tokenizer.ggml.eos_token_id"),
        ("pad_token_id", "tokenizer.ggml.padding_token_id"),
    ]:
        if gguf_key in meta:
            config[hf_key] = int(meta[gguf_key])
        elif hf_key != "pad_token_id":
            config[hf_key] = None
    return config


def _expected_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    d, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    q = config["num_attention_heads"] * config["head_dim"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, d)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (d,),
            p + "post_attention_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (q, d),
            p + "self_attn.k_proj.weight": (kv, d),
            p + "self_attn.v_proj.weight": (kv, d),
            p + "self_attn.o_proj.weight": (d, q),
            p + "mlp.gate_proj.weight": (f, d),
            p + "mlp.up_proj.weight": (f, d),
            p + "mlp.down_proj.weight": (d, f),
        }
    return shapes


def _hf_name(gguf_name: str, n_layers: int) -> str | None:
    for pat, hf in _TENSOR_PATTERNS:
        m = pat.fullmatch(gguf_name)
        if m:
            if m.groups():
                i = int(m.group(1))
                if i >= n_layers:
                    return None
                return hf.format(i=i)
            return hf
    return None


def _dequantize(path: Path, t: Any) -> np.ndarray:
    """One ``gguf.ReaderTensor`` -> float32 array in torch layout (reversed GGUF dims)."""
    from gguf.quants import dequantize

    shape = tuple(int(x) for x in reversed(t.shape.tolist()))
    try:
        w = dequantize(t.data, t.tensor_type)
    except NotImplementedError as exc:
        raise GGUFError(
            f"{path}: tensor {t.name!r} has type {t.tensor_type.name}, which cannot be "
            f"dequantised ({exc})"
        ) from exc
    except Exception as exc:
        raise GGUFError(
            f"{path}: tensor {t.name!r} ({t.tensor_type.name}) is corrupt: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    if w.size != int(np.prod(shape)):
        raise GGUFError(
            f"{path}: tensor {t.name!r} ({t.tensor_type.name}) holds {w.size} values, "
            f"its recorded shape {shape} needs {int(np.prod(shape))}"
        )
    return np.asarray(w, dtype=np.float32).reshape(shape)


# ----------------------------------------------------------------------------- public API


def read_gguf(path: str | os.PathLike[str], *, dtype: Any = np.float32) -> GGUFModel:
    """Read a Llama-architecture GGUF file into an HF-style config and state dict.

    Args:
      path: the ``.gguf`` file (single file; split ``-00001-of-N`` files are not supported).
      dtype: numpy dtype of the returned arrays (``np.float32`` default; ``np.float16`` or
        ``ml_dtypes.bfloat16`` also work). Quantised tensors are dequantised in float32 first.

    Returns:
      :class:`GGUFModel` whose ``tensors`` are keyed exactly like
      ``LlamaForCausalLM.state_dict()`` (``lm_head.weight`` only when the file has
      ``output.weight``), in torch layout ``[out, in]``:

      - ``model.embed_tokens.weight`` / ``lm_head.weight``: ``[vocab_size, hidden_size]``
      - ``self_attn.q_proj``: ``[num_attention_heads * head_dim, hidden_size]``
      - ``self_attn.{k,v}_proj``: ``[num_key_value_heads * head_dim, hidden_size]``
      - ``self_attn.o_proj``: ``[hidden_size, num_attention_heads * head_dim]``
      - ``mlp.{gate,up}_proj``: ``[intermediate_size, hidden_size]``; ``mlp.down_proj`` transposed
      - norms: ``[hidden_size]``

      and whose ``config`` holds ``model_type``, ``vocab_size``, ``hidden_size``,
      ``intermediate_size``, ``num_hidden_layers``, ``num_attention_heads``,
      ``num_key_value_heads``, ``head_dim``, ``rms_norm_eps``, ``rope_theta``, ``rope_scaling``
      (``{"rope_type": "linear", "factor": f}`` or ``None``), ``max_position_embeddings``,
      ``tie_word_embeddings``, ``bos_token_id``, ``eos_token_id``, ``pad_token_id`` (if present),
      and the fixed Llama facts ``hidden_act="silu"``, ``attention_bias=mlp_bias=False``.

    Raises:
      FileNotFoundError: no such file.
      GGUFError (a ``ValueError``): not parseable (truncated/corrupt), architecture other than
        ``llama``, unhandled metadata, unknown/missing/duplicate tensors, wrong shapes, or a
        tensor type ``gguf`` cannot dequantise. Messages name the file and the offending key.
    """
    path = Path(path)
    reader = _open(path)
    try:  # the big vocabulary arrays are the tokenizer's business, not the model's
        meta = {k: _field_value(f) for k, f in reader.fields.items() if k not in _VOCAB_ARRAYS}
    except Exception as exc:
        raise GGUFError(f"{path}: corrupt metadata: {type(exc).__name__}: {exc}") from exc
    by_name = {t.name: t for t in reader.tensors}
    config = _build_config(path, meta, set(by_name))
    n_layers = config["num_hidden_layers"]

    # vocab_size from the embedding when the metadata lacks it (GGUF dims are reversed).
    embd_rows = int(by_name["token_embd.weight"].shape[-1])
    config.setdefault("vocab_size", embd_rows)

    # Map names first so every offender is reported at once, before any dequantisation.
    expected = _expected_shapes(config)
    mapping: dict[str, str] = {}
    problems: list[str] = []
    for name, t in by_name.items():
        if name in _KNOWN_UNSUPPORTED_TENSORS:
            problems.append(f"{name!r}: {_KNOWN_UNSUPPORTED_TENSORS[name]}")
            continue
        hf = _hf_name(name, n_layers)
        if hf is None:
            problems.append(f"unknown tensor {name!r}")
            continue
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        if shape != expected[hf]:
            problems.append(f"tensor {name!r} ({hf}) has shape {shape}, expected {expected[hf]}")
        mapping[name] = hf
    missing = sorted(set(expected) - set(mapping.values()))
    if missing:
        problems.append("missing tensors for " + ", ".join(missing))
    if problems:
        raise GGUFError(f"{path}: not a valid Llama GGUF:\n  " + "\n  ".join(problems))

    tensors: dict[str, np.ndarray] = {}
    for name, hf in mapping.items():
        w = _dequantize(path, by_name[name])
        if hf.endswith("self_attn.q_proj.weight"):
            w = _unpermute_qk(w, config["num_attention_heads"])
        elif hf.endswith("self_attn.k_proj.weight"):
            w = _unpermute_qk(w, config["num_key_value_heads"])
        # Always a fresh, C-contiguous array: nothing refers to the memory-mapped file afterwards.
        tensors[hf] = np.array(w, dtype=dtype, order="C", copy=True)

    chat_template = meta.get("tokenizer.chat_template")
    del reader
    return GGUFModel(config=config, tensors=tensors, path=path, chat_template=chat_template)


def load_gguf_tokenizer(path: str | os.PathLike[str]):
    """A transformers fast tokenizer built from the GGUF's ``tokenizer.*`` metadata.

    Uses ``AutoTokenizer.from_pretrained(dir, gguf_file=name, local_files_only=True)``, so it never
    touches the network (works with ``HF_HUB_OFFLINE=1``). The file's
    ``tokenizer.chat_template``, when present, is set as ``tokenizer.chat_template``.

    Raises:
      FileNotFoundError: no such file.
      GGUFError: transformers could not build a tokenizer (the message names the file).
    """
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        tok = AutoTokenizer.from_pretrained(
            str(path.parent), gguf_file=path.name, local_files_only=True
        )
    except Exception as exc:
        raise GGUFError(
            f"{path}: transformers could not build a tokenizer from the GGUF metadata: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    if getattr(tok, "chat_template", None) is None:
        template = read_gguf_metadata(path).get("tokenizer.chat_template")
        if template is not None:
            tok.chat_template = template
    return tok
