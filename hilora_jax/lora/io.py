"""Pool front door, orbax save/restore of pools, and export of pool members back to PEFT.

* `load_pool(src, model=...)`: `src` is a manifest file (JSON/YAML), a manifest dict, a folder of
  adapter directories, or a saved pool directory. Every adapter is read torch-free and checked
  against the base model's config (`io.peft.read_adapter`), then stacked (`LoraPool`).
* `save_pool(pool, out)` writes `out/arrays` (orbax, flat `{"A.q_proj": ..., "ranks": ...}`) and
  `out/pool.json` (format version, names, clusters, samples, sources, configs, array shapes) into a
  temp dir renamed into place (`_fs.atomic_dir`): a failure leaves nothing behind.
  `load_pool_dir(path, mesh)` restores every array straight onto its sharding.
* `export_peft(pool, name_or_weights, out)` writes one adapter, or a weighted combination of
  adapters as one concatenated-rank LoRA, as a PEFT adapter directory (`io.peft.write_adapter`,
  the one PEFT writer): for every adapted
  (layer, module), `lora_A = [A_i rows]`, `lora_B = [w_i s_i b_ij columns]`, so
  `lora_B @ lora_A = sum_i w_i s_i B_i A_i`. The config sets `lora_alpha = r` and, per module whose
  rank differs, `rank_pattern[k] = alpha_pattern[k] = rank`, so PEFT's scale is exactly 1;
  `target_modules` is a regex naming exactly the adapted module keys.
* `convert_pool` / `export_adapter`: the functions behind `hilora convert-pool` / `export-adapter`.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, SingleDeviceSharding

from hilora_jax._fs import atomic_dir
from hilora_jax.io.checkpoint import restore_arrays, save_arrays
from hilora_jax.io.peft import AdapterError, module_key, read_adapter, write_adapter
from hilora_jax.lora.manifest import PoolManifest, read_manifest
from hilora_jax.lora.pool import LoraPool, PoolArrays, pool_shardings
from hilora_jax.model.config import ModelConfig
from hilora_jax.model.projections import family_table, projection

POOL_FORMAT_VERSION = 1
POOL_META = "pool.json"


def model_config_of(model: Any) -> ModelConfig:
    """`ModelConfig` of a `CausalLM`, a `ModelConfig`, or any model source `load_model` accepts
    (only the config is read for HF and converted directories)."""
    from hilora_jax.t5.config import T5Config

    if isinstance(model, (ModelConfig, T5Config)):
        return model
    if hasattr(model, "config") and isinstance(model.config, (ModelConfig, T5Config)):
        return model.config
    from hilora_jax.io.loading import resolve_source

    kind, path = resolve_source(model)
    if kind == "hf" and _model_type(path / "config.json") == "t5":
        from hilora_jax.t5.config import read_t5_config

        return read_t5_config(path)
    if kind == "converted":
        from hilora_jax.io.checkpoint import read_meta

        return ModelConfig.from_dict(read_meta(path)["config"])
    if kind == "hf":
        return ModelConfig.from_hf_config(path / "config.json")
    from hilora_jax.io.gguf import read_gguf

    return ModelConfig.from_hf_config(read_gguf(path).config, source=str(path))


def _model_type(config_json: Path) -> str | None:
    try:
        return json.loads(config_json.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None  # the family's own reader reports the problem


def adapter_reader(cfg):
    """The PEFT reader for the base config's family: `io.peft.read_adapter` (Llama) or
    `t5.lora.read_t5_pool_adapter` (T5); both return `io.peft.PeftAdapter`s keyed `(layer, row)`."""
    from hilora_jax.t5.config import T5Config

    if isinstance(cfg, T5Config):
        from hilora_jax.t5.lora import read_t5_pool_adapter

        return read_t5_pool_adapter
    return read_adapter


def _bar(items, desc: str, progress: bool):
    if not progress or os.environ.get("HILORA_QUIET") == "1":
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="adapter", file=sys.stderr)


def is_pool_dir(p: Any) -> bool:
    return isinstance(p, (str, os.PathLike)) and (Path(p) / POOL_META).exists()


def load_pool(src: str | os.PathLike | Mapping | PoolManifest, *, model: Any = None,
              mesh: Mesh | None = None, dtype=jnp.float32, progress: bool = True) -> LoraPool:
    """Build a `LoraPool` from a manifest (file, dict, `PoolManifest`), a folder of adapter dirs,
    or a saved pool dir.

    `model`: the base `CausalLM`, its `ModelConfig`, or a model source; defaults to the manifest's
    `base`. With `mesh`, arrays are placed on their shardings. Raises `AdapterError` /
    `ManifestError` naming the adapter and field or tensor key on any problem.
    """
    if is_pool_dir(src):
        pool = load_pool_dir(src, mesh=mesh)
        if model is not None:
            check_pool_fits(pool.arrays, model_config_of(model), str(src))
        return pool
    man = src if isinstance(src, PoolManifest) else read_manifest(src)
    if model is None:
        if man.base is None:
            raise ValueError(f"{man.source}: no base model given (pass model= or set 'base')")
        model = man.base
    cfg = model_config_of(model)
    read = adapter_reader(cfg)
    adapters = [read(e.path, cfg, name=e.name, base=man.base)
                for e in _bar(man.adapters, "reading adapters", progress)]
    return LoraPool.from_adapters(
        adapters, cfg, clusters={e.name: e.cluster for e in man.adapters},
        samples={e.name: e.samples for e in man.adapters}, dtype=dtype, mesh=mesh)


def check_pool_fits(arrays: PoolArrays, cfg, where: str) -> None:
    """`AdapterError` (naming `where`) unless every module of the pool's stacked `arrays` (real or
    `jax.ShapeDtypeStruct`s) is a projection of `cfg`'s family table with its layer count and
    `(d_in, d_out)` (`hilora aot --pool DIR` checks shapes only with it)."""
    table = {p.name: p for p in family_table(cfg)}
    for m in arrays.modules:
        if m not in table:
            raise AdapterError(f"{where}: pool module {m!r} is not a projection of this "
                               f"{cfg.model_type} model (its projections: {', '.join(table)})")
        L, _, _, d_in = arrays.A[m].shape
        d_out = arrays.B[m].shape[-1]
        want_l, want = table[m].num_layers(cfg), table[m].shape(cfg)
        if L != want_l or (d_in, d_out) != want:
            raise AdapterError(f"{where}: pool module {m} has L={L}, (d_in, d_out)={(d_in, d_out)}; "
                               f"the model has L={want_l}, {want}")


def _flat(arrays: PoolArrays) -> dict[str, jax.Array]:
    out = {"ranks": arrays.ranks, "active": arrays.active}
    for field in ("A", "B", "scale", "mask"):
        for m, v in getattr(arrays, field).items():
            out[f"{field}.{m}"] = v
    return out


def save_pool(pool: LoraPool, out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write a pool directory atomically (see module docstring)."""
    out = Path(out).absolute()
    flat = _flat(pool.arrays)
    meta = {
        "format_version": POOL_FORMAT_VERSION,
        "names": list(pool.names),
        "clusters": pool.clusters,
        "samples": {n: None if s is None else list(s) for n, s in pool.samples.items()},
        "sources": pool.sources,
        "configs": pool.configs,
        "arrays": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in flat.items()},
    }
    with atomic_dir(out, overwrite=overwrite) as tmp:
        save_arrays(tmp / "arrays", flat)
        (tmp / POOL_META).write_text(json.dumps(meta, indent=1))
    return out


def load_pool_dir(path: str | os.PathLike, *, mesh: Mesh | None = None) -> LoraPool:
    """Restore a saved pool; with `mesh` every array is read directly onto its sharding."""
    path = Path(path).absolute()
    try:
        meta = json.loads((path / POOL_META).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise AdapterError(f"{path / POOL_META}: unreadable pool metadata ({e})") from e
    if meta.get("format_version") != POOL_FORMAT_VERSION:
        raise AdapterError(f"{path / POOL_META}: format_version {meta.get('format_version')} is not "
                           f"{POOL_FORMAT_VERSION}")
    shapes = {k: jax.ShapeDtypeStruct(tuple(v["shape"]), jnp.dtype(v["dtype"]))
              for k, v in meta["arrays"].items()}
    abstract = _unflat(shapes)
    if mesh is not None:
        sh = pool_shardings(abstract, mesh)
    else:
        dev = SingleDeviceSharding(jax.devices()[0])
        sh = jax.tree.map(lambda _: dev, abstract)
    abs_sharded = jax.tree.map(lambda s, h: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=h),
                               abstract, sh)
    flat = restore_arrays(path / "arrays", _flat(abs_sharded))
    missing = sorted(set(shapes) - set(flat))
    if missing:
        raise AdapterError(f"{path}/arrays: missing arrays {missing}")
    return LoraPool(_unflat(flat), meta["names"], clusters=meta["clusters"],
                    samples={n: None if s is None else tuple(s) for n, s in meta["samples"].items()},
                    sources=meta["sources"], configs=meta["configs"], mesh=mesh)


def _unflat(flat: Mapping[str, Any]) -> PoolArrays:
    parts: dict[str, dict] = {"A": {}, "B": {}, "scale": {}, "mask": {}}
    for k, v in flat.items():
        if "." in k:
            field, m = k.split(".", 1)
            parts[field][m] = v
    return PoolArrays(A=parts["A"], B=parts["B"], scale=parts["scale"], mask=parts["mask"],
                      ranks=flat["ranks"], active=flat["active"])


# -- export --------------------------------------------------------------------------------
def combination_weights(pool: LoraPool, name_or_weights: str | Sequence[float] | Mapping[str, float]
                        ) -> np.ndarray:
    """Weights `[A]` from an adapter name (one-hot), a `{name: weight}` dict, or a full vector."""
    n = len(pool)
    if isinstance(name_or_weights, str):
        w = np.zeros(n)
        w[pool.index(name_or_weights)] = 1.0
    elif isinstance(name_or_weights, Mapping):
        w = np.zeros(n)
        for k, v in name_or_weights.items():
            w[pool.index(k)] = float(v)
    else:
        w = np.asarray(name_or_weights, np.float64)
        if w.shape != (n,):
            raise ValueError(f"weights must have shape ({n},), got {w.shape}")
    return w * np.asarray(pool.arrays.active)


def combined_modules(pool: LoraPool, weights: np.ndarray
                     ) -> dict[tuple[int, str], tuple[np.ndarray, np.ndarray]]:
    """Concatenated-rank ROC rows `(A [r, D], B [r, E])` per `(layer, module)` for
    `sum_i w_i s_i B_i A_i` (the scale folded into B)."""
    a = jax.tree.map(np.asarray, pool.arrays)
    modules = {}
    used = np.flatnonzero(weights != 0)
    for m in a.modules:
        L = a.A[m].shape[0]
        for li in range(L):
            rows_a, cols_b = [], []
            for i in used:
                valid = a.mask[m][li, i]  # R
                if not valid.any():
                    continue
                rows_a.append(a.A[m][li, i, valid].astype(np.float32))  # r D
                coef = (weights[i] * a.scale[m][li, i, valid]).astype(np.float32)  # r
                cols_b.append(a.B[m][li, i, valid].astype(np.float32) * coef[:, None])  # r E
            if not rows_a:
                continue
            modules[(li, m)] = (np.concatenate(rows_a), np.concatenate(cols_b))  # [r, D], [r, E]
    return modules


def export_peft(pool: LoraPool, name_or_weights, out: str | os.PathLike, *,
                overwrite: bool = False) -> Path:
    """Write adapter `name`, or the combination `sum_i w_i dW_i`, as a PEFT adapter dir (atomic)."""
    w = combination_weights(pool, name_or_weights)
    if not np.any(w):
        raise ValueError("nothing to export: every weight is zero (or the adapters are inactive)")
    modules = combined_modules(pool, w)
    if not modules:
        raise ValueError("nothing to export: the selected adapters adapt no module")
    ranks = {module_key(li, m): int(a.shape[0]) for (li, m), (a, _) in modules.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {re.escape(k): v for k, v in ranks.items() if v != r}
    used = [pool.names[i] for i in np.flatnonzero(w)]
    bases = {pool.configs[n].get("base_model_name_or_path") for n in used} - {None}
    seq2seq = all(projection(m).key.startswith(("encoder.", "decoder.")) for _, m in modules)
    cfg = {
        "peft_type": "LORA", "task_type": "SEQ_2_SEQ_LM" if seq2seq else "CAUSAL_LM",
        "base_model_name_or_path": bases.pop() if len(bases) == 1 else None,
        "r": int(r), "lora_alpha": int(r), "use_rslora": False,
        "rank_pattern": pattern, "alpha_pattern": dict(pattern),
        "target_modules": "(" + "|".join(re.escape(k) for k in sorted(ranks)) + ")",
        "bias": "none", "lora_dropout": 0.0, "fan_in_fan_out": False,
        "init_lora_weights": True, "inference_mode": True,
    }
    meta = {"hilora_export": json.dumps({n: float(w[pool.index(n)]) for n in used})}
    return write_adapter(out, cfg, modules, metadata=meta, overwrite=overwrite)


# -- CLI entry points ----------------------------------------------------------------------
def convert_pool(manifest, model_dir=None, out=None, *, progress: bool = True,
                 overwrite: bool = False) -> Path:
    """`hilora convert-pool MANIFEST --model MODEL_DIR --out POOL_DIR`: read, check, save.

    Nothing is written unless every adapter reads and checks cleanly (atomic output dir).
    """
    if out is None:
        raise ValueError("convert_pool needs an output directory")
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (pass overwrite=True / --overwrite)")
    pool = load_pool(manifest, model=model_dir, progress=progress)
    return save_pool(pool, out, overwrite=overwrite)


def export_adapter(pool_dir, name_or_weights, out, *, overwrite: bool = False) -> Path:
    """`hilora export-adapter POOL_DIR NAME --out DIR`: one adapter or a weighted combination."""
    return export_peft(load_pool_dir(pool_dir), name_or_weights, out, overwrite=overwrite)
