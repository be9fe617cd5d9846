"""HF T5 checkpoints -> `T5ForConditionalGeneration`, through one strict mapping table.

Sources: `model.safetensors`, sharded safetensors with `model.safetensors.index.json` (read
with the project's torch-free reader), or `pytorch_model.bin` (sharded with
`pytorch_model.bin.index.json`) through `torch.load(weights_only=True)` when torch is installed.

Strict: every tensor must map to a parameter (or be a known alias / ignored key), every
parameter must be filled, shapes must match, values must be finite; all problems are reported in
one `CheckpointError` line naming the HF key and file. Nothing is zero-filled. With a mesh each
tensor is placed straight onto its `NamedSharding` (the logical axes of
`hilora_jax.t5.projections.PARAM_AXES`).

Head: a config that says `tie_word_embeddings: false` needs `lm_head.weight`; a tied config
(every transformers 5.x save) whose checkpoint carries an `lm_head.weight` different from
`shared.weight` gets an untied head, as transformers 5 does; an equal one stays tied.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from hilora_jax.io.hf import (  # _T: torch Linear [out, in] -> kernel [in, out]
    _T,
    KeyMapper,
    StrictFill,
)
from hilora_jax.io.safetensors import (
    CheckpointError,
    SafetensorsFile,
)
from hilora_jax.model import sharding as shd
from hilora_jax.t5.config import T5Config, read_t5_config
from hilora_jax.t5.model import T5ForConditionalGeneration
from hilora_jax.t5.projections import param_logical_axes

_ID = lambda a: a  # noqa: E731

_S = r"(encoder|decoder)\.block\.(\d+)\.layer\.(\d+)"
# (HF key regex, target parameter path template, transform)
T5_TABLE: list[tuple[str, str, Callable]] = [
    (r"shared\.weight", "shared.embedding", _ID),
    (r"lm_head\.weight", "lm_head.kernel", _T),
    (_S + r"\.(SelfAttention|EncDecAttention)\.(q|k|v|o)\.weight", "{0}.block.{1}.layer.{2}.{3}.{4}.kernel", _T),
    (_S + r"\.SelfAttention\.relative_attention_bias\.weight",
     "{0}.block.{1}.layer.{2}.SelfAttention.relative_attention_bias.embedding", _ID),
    (_S + r"\.DenseReluDense\.(wi|wi_0|wi_1|wo)\.weight", "{0}.block.{1}.layer.{2}.DenseReluDense.{3}.kernel", _T),
    (_S + r"\.layer_norm\.weight", "{0}.block.{1}.layer.{2}.layer_norm.weight", _ID),
    (r"(encoder|decoder)\.final_layer_norm\.weight", "{0}.final_layer_norm.weight", _ID),
]
# Copies of `shared.weight` some checkpoints carry (must equal it).
EMBED_ALIASES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
# Keys transformers itself ignores when loading (an unused bias some old conversions saved).
IGNORED_KEYS = [r"decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight"]

T5_KEYS = KeyMapper(T5_TABLE, IGNORED_KEYS)


def map_key(key: str) -> tuple[str, Callable] | None:
    return T5_KEYS(key)


def hf_key(target: str) -> str:
    """The HF key that fills parameter `target` (inverse of the table)."""
    if target == "shared.embedding":
        return "shared.weight"
    return re.sub(r"\.(kernel|embedding)$", ".weight", target)


def _path_str(path) -> str:
    return ".".join(str(p) for p in path)


def abstract_model(cfg: T5Config, dtype=jnp.float32):
    """Graph definition, state and `{path: ShapeDtypeStruct}`, allocating nothing."""
    abs_model = nnx.eval_shape(lambda: T5ForConditionalGeneration(cfg, dtype=dtype,
                                                                  rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abs_model)
    flat = {_path_str(p): v for p, v in nnx.to_flat_state(state)}
    return graphdef, state, flat


def param_sharding(path: str, shape, mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, shd.logical_to_spec(param_logical_axes(path), shape, mesh,
                                                   what=path))


# -- sources -----------------------------------------------------------------------------------
Tensors = Iterable[tuple[str, Callable[[], np.ndarray], str]]


def _torch_to_numpy(t) -> np.ndarray:
    import torch

    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _load_bin(path: Path) -> dict:
    try:
        import torch
    except ImportError as e:
        raise CheckpointError(f"{path}: reading pytorch_model.bin needs torch, which is not "
                              "installed; install torch or convert the checkpoint to safetensors")\
            from e
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad/unsafe file
        raise CheckpointError(f"{path}: cannot load with torch.load(weights_only=True) "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")\
            from e
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: expected a state dict, got {type(sd).__name__}")
    return sd


def _index_files(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: malformed index ({e})") from e
    files = sorted({index.parent / f for f in weight_map.values()})
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise CheckpointError(f"{index}: lists shard files that do not exist: {missing}")
    return files


def checkpoint_tensors(model_dir: str | Path) -> tuple[list[str], Callable[[], Iterator]]:
    """`(all keys, iterator factory of (key, load_fn, file))` of a HF T5 directory.

    Prefers safetensors (single file or index); falls back to `pytorch_model.bin` (or its index).
    """
    d = Path(model_dir)
    if (d / "model.safetensors.index.json").exists():
        files = _index_files(d / "model.safetensors.index.json")
    elif (d / "model.safetensors").exists():
        files = [d / "model.safetensors"]
    else:
        files = []
    if files:
        sts = [SafetensorsFile(f) for f in files]

        def it():
            for st in sts:
                for key in st:
                    yield key, (lambda st=st, key=key: st[key]), str(st.path)

        return [k for st in sts for k in st], it
    if (d / "pytorch_model.bin.index.json").exists():
        bins = _index_files(d / "pytorch_model.bin.index.json")
    elif (d / "pytorch_model.bin").exists():
        bins = [d / "pytorch_model.bin"]
    else:
        raise CheckpointError(f"{d}: no model.safetensors, model.safetensors.index.json, "
                              "pytorch_model.bin or pytorch_model.bin.index.json")
    sds = [(f, _load_bin(f)) for f in bins]

    def it_bin():
        for f, sd in sds:
            for key, t in sd.items():
                yield key, (lambda t=t: _torch_to_numpy(t)), str(f)

    return [k for _, sd in sds for k in sd], it_bin


# -- building ----------------------------------------------------------------------------------
def _decide_head(cfg: T5Config, keys: list[str], tensors: Callable[[], Iterator]) -> T5Config:
    if "lm_head.weight" not in keys or not cfg.tie_word_embeddings:
        return cfg
    got = {}
    for key, load, _ in tensors():
        if key in ("lm_head.weight", "shared.weight"):
            got[key] = load()
            if len(got) == 2:
                break
    if "shared.weight" not in got:
        return cfg  # reported as missing by the build
    head, emb = got["lm_head.weight"], got["shared.weight"]
    same = head.shape == emb.shape and np.array_equal(np.asarray(head, np.float32),
                                                      np.asarray(emb, np.float32))
    return cfg if same else dataclasses.replace(cfg, tie_word_embeddings=False)


def build_model(cfg: T5Config, tensors: Tensors, *, dtype=jnp.float32, mesh: Mesh | None = None,
                where: str = "checkpoint") -> T5ForConditionalGeneration:
    """Fill a model from `(hf_key, load_fn, source_file)` triples, strictly (see module doc)."""
    graphdef, state, flat = abstract_model(cfg, dtype)
    fill = StrictFill(flat)
    problems = fill.problems
    aliases: list[tuple[str, Callable, str]] = []
    for key, load, src in tensors:
        if T5_KEYS.ignored(key):
            continue
        if key in EMBED_ALIASES or (key == "lm_head.weight" and cfg.tie_word_embeddings):
            aliases.append((key, load, src))
            continue
        m = map_key(key)
        if m is None:
            problems.append(f"unexpected tensor {key!r} in {src}")
            continue
        target, fn = m
        fill.add(key, src, target, fn, load, dtype=lambda t: flat[t].dtype,
                 sharding_of=(lambda t, shape: param_sharding(t, shape, mesh)) if mesh else None,
                 absent=f"has no parameter in this config ({cfg.variant}, "
                        f"{cfg.num_layers}+{cfg.num_decoder_layers} blocks)")
    filled = fill.filled
    for t in fill.missing():
        problems.append(f"missing tensor {hf_key(t)!r}")
    if "shared.embedding" in filled:
        emb = None
        for key, load, src in aliases:
            if emb is None:
                emb = np.asarray(filled["shared.embedding"], np.float32)
            a = np.asarray(load(), np.float32)
            if a.shape != emb.shape or not np.allclose(a, emb):
                problems.append(f"tensor {key!r} in {src} differs from 'shared.weight' (T5 ties "
                                "it to the shared embedding)")
    if problems:
        shown = "; ".join(problems[:8]) + (f"; ... ({len(problems) - 8} more)"
                                           if len(problems) > 8 else "")
        raise CheckpointError(f"{where}: {len(problems)} problem(s) loading T5 weights: {shown}")
    for path, var in nnx.to_flat_state(state):
        var.set_value(filled[_path_str(path)])
    return nnx.merge(graphdef, state)


def load_t5(model_dir: str | Path, *, dtype=jnp.float32, mesh: Mesh | None = None
            ) -> T5ForConditionalGeneration:
    """Load a HF T5 / FLAN-T5 directory (config checked first, before any tensor is read)."""
    d = Path(model_dir)
    if not d.is_dir():
        raise CheckpointError(f"{d}: not a directory")
    cfg = read_t5_config(d)
    keys, tensors = checkpoint_tensors(d)
    if not cfg.tie_word_embeddings and "lm_head.weight" not in keys:
        raise CheckpointError(f"{d}: missing tensor 'lm_head.weight' (config.json says "
                              "tie_word_embeddings=false: an untied head)")
    cfg = _decide_head(cfg, keys, tensors)
    return build_model(cfg, tensors(), dtype=dtype, mesh=mesh, where=str(d))
