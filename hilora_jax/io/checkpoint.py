"""orbax save/restore of converted models, restored straight into a given sharding.

A converted model directory holds
  * `hilora_model.json`: format version, `ModelConfig`, dtype, and where it came from;
  * `params/`: an orbax checkpoint of the flat `{parameter path: array}` dict;
  * `tokenizer/`: the tokenizer files (when one was given).

Saving writes everything into a temporary sibling directory and renames it into place, so a failed
or interrupted conversion leaves nothing half-written. Restoring builds the abstract tree with each
leaf's `NamedSharding` and lets orbax read every shard directly onto its device, without a full
host copy.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from hilora_jax._fs import atomic_dir
from hilora_jax.io.hf import _path_str, abstract_model
from hilora_jax.model import sharding as shd
from hilora_jax.model.config import ModelConfig
from hilora_jax.model.llama import CausalLM

FORMAT_VERSION = 1


def flat_params(model: CausalLM) -> dict[str, jax.Array]:
    _, state = nnx.split(model)
    return {_path_str(p): v.get_value() for p, v in nnx.to_flat_state(state)}


# 4-bit arrays (int4 kernels, `hilora_jax.model.quant`) are stored one code per byte: orbax /
# tensorstore have no 4-bit type
_STORED_AS = {jnp.dtype(jnp.uint4): jnp.dtype(jnp.uint8), jnp.dtype(jnp.int4): jnp.dtype(jnp.int8)}


def save_arrays(path: Path, arrays: dict[str, jax.Array]) -> None:
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(Path(path).absolute(),
               {k: v.astype(_STORED_AS[v.dtype]) if v.dtype in _STORED_AS else v
                for k, v in arrays.items()})
    ckptr.wait_until_finished()


def restore_arrays(path: Path, abstract: dict[str, jax.ShapeDtypeStruct]) -> dict[str, jax.Array]:
    ckptr = ocp.StandardCheckpointer()
    stored = {k: jax.ShapeDtypeStruct(v.shape, _STORED_AS[v.dtype], sharding=v.sharding)
              if v.dtype in _STORED_AS else v for k, v in abstract.items()}
    out = ckptr.restore(Path(path).absolute(), stored)
    return {k: out[k].astype(abstract[k].dtype) if abstract[k].dtype in _STORED_AS else out[k]
            for k in out}


def save_model(model: CausalLM, out: str | os.PathLike, *, tokenizer=None, source: str = "",
               overwrite: bool = False) -> Path:
    """Write a converted model directory atomically."""
    from hilora_jax.model.quant import model_weights

    out = Path(out).absolute()
    with atomic_dir(out, overwrite=overwrite) as tmp:
        save_arrays(tmp / "params", flat_params(model))
        meta = {
            "format_version": FORMAT_VERSION,
            "config": model.config.to_dict(),
            "dtype": str(jnp.dtype(model.dtype)),
            "weights": model_weights(model),  # "int8" / "int4": hilora_jax.model.quant
            "source": source,
        }
        (tmp / "hilora_model.json").write_text(json.dumps(meta, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp / "tokenizer"))
    return out


def read_meta(path: str | os.PathLike) -> dict:
    p = Path(path) / "hilora_model.json"
    meta = json.loads(p.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{p}: format_version {meta.get('format_version')} is not "
                         f"{FORMAT_VERSION}")
    return meta


def restore_model(path: str | os.PathLike, *, dtype=None, mesh: Mesh | None = None) -> CausalLM:
    """Restore a converted model; with `mesh`, each array lands directly on its sharding."""
    path = Path(path).absolute()
    meta = read_meta(path)
    cfg = ModelConfig.from_dict(meta["config"])
    stored = jnp.dtype(meta["dtype"])
    if meta.get("weights"):  # int8 / int4 kernels + their scales (hilora_jax.model.quant)
        from hilora_jax.model.quant import abstract_quantized_model, check_weights

        graphdef, state, flat = abstract_quantized_model(cfg, stored,
                                                         check_weights(meta["weights"]))
    else:
        graphdef, state, flat = abstract_model(cfg, stored)
    abstract = {}
    for k, v in flat.items():
        sharding = (shd.param_sharding(k, v.shape, mesh) if mesh is not None
                    else jax.sharding.SingleDeviceSharding(jax.devices()[0]))
        abstract[k] = jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding)
    arrays = restore_arrays(path / "params", abstract)
    missing = sorted(set(flat) - set(arrays))
    if missing:
        raise ValueError(f"{path}/params: missing parameters {missing}")
    for p, var in nnx.to_flat_state(state):
        a = arrays[_path_str(p)]
        if dtype is not None and jnp.dtype(dtype) != stored and a.dtype == stored \
                and not _path_str(p).endswith((".scale", ".group_scale", ".group_min")):
            # quantised kernels and their scales keep their dtypes
            a = a.astype(dtype)
        var.set_value(a)
    model = nnx.merge(graphdef, state)
    if dtype is not None and jnp.dtype(dtype) != stored:
        model.dtype = jnp.dtype(dtype)
    return model


def to_numpy_tree(tree):
    return jax.tree.map(np.asarray, tree)
