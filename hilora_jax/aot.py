"""`hilora aot`: ahead-of-time compile what `Engine` runs, for a TPU slice or the local backend.

The programs are the real ones: `inference.prefill_jit` (prompt -> KV cache) and
`inference.decode_step_jit_for` (one token, with the target's compile options), the very functions
`Engine` runs, lowered with *abstract* arguments (`jax.ShapeDtypeStruct` carrying the
`NamedSharding`s of the rules table in `hilora_jax.model.sharding`): parameters, LoRA pool, routing
decisions and KV cache are never allocated.
The LoRA hook is the router's real hook pytree (`HiLoRAHook`, `ArrowHook`, sparse `GatedHook`).

Targets: a TPU topology (`v4-8`, `v5e-1`, `v5e-8`, `v5p-8`, `v6e-1`, `v6e-8`), described on any
host by libtpu (`jax.experimental.topologies.get_topology_desc`), or `local` (this process's
devices: CPU, or a GPU, where the compiled calls are also timed on zero-filled inputs).

Report (table + JSON, see `analyze`): per-device memory of each program (arguments, outputs,
aliased, temporaries, code) against the chip's HBM; flops and bytes from XLA's cost analysis; a
roofline time `max(flops / peak, bytes / HBM bandwidth, collective bytes / ICI bandwidth)`; the
decode step's bytes divided by the minimum it must read (weights + KV cache + the LoRA slots it
uses, each once, per device; an untied embedding table counts only the rows gathered); the
collectives of the compiled HLO; routed / base ratios.

Environment: libtpu must never look for a cloud metadata server on a machine that is not a TPU VM.
On a host with no TPU chips, `topology_devices` sets `TPU_SKIP_MDS_QUERY=1` (and quiet defaults for
`TPU_WORKER_HOSTNAMES` / `TPU_ACCELERATOR_TYPE`) before libtpu is loaded; on a TPU VM nothing is
changed. Processes that may load libtpu some other way should set `TPU_SKIP_MDS_QUERY=1` themselves
before importing jax (the test suite does).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from hilora_jax.errors import HiloraUserError
from hilora_jax.inference import bucket_length, decode_step_jit_for, kv_cache_sharding, prefill_jit
from hilora_jax.model import sharding as shd
from hilora_jax.model.config import ModelConfig, RopeConfig
from hilora_jax.model.llama import KVCache
from hilora_jax.model.projections import MODULES, projection
from hilora_jax.t5.config import T5Config


class AotError(HiloraUserError, ValueError):
    """Bad input to `hilora aot` (one line naming the topology / preset / pool / mesh / flag)."""


# ---------------------------------------------------------------------------------------------
# Model presets: the published shapes (each repo's config.json on the Hugging Face hub).
PRESETS: dict[str, ModelConfig | T5Config] = {
    # meta-llama/Llama-2-7b-hf config.json
    "llama-2-7b": ModelConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
        num_kv_heads=32, head_dim=128, rms_norm_eps=1e-5, rope=RopeConfig(theta=10000.0),
        max_position_embeddings=4096, model_type="llama"),
    # meta-llama/Llama-3.1-8B config.json (rope_scaling: llama3, factor 8)
    "llama-3.1-8b": ModelConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
        num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5,
        rope=RopeConfig(theta=500000.0, rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                        high_freq_factor=4.0, original_max_position_embeddings=8192),
        max_position_embeddings=131072, model_type="llama"),
    # mistralai/Mistral-7B-v0.1 config.json (sliding_window 4096)
    "mistral-7b": ModelConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
        num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope=RopeConfig(theta=10000.0),
        max_position_embeddings=32768, sliding_window=4096, model_type="mistral"),
    # Qwen/Qwen2.5-7B config.json (q/k/v biases; use_sliding_window false)
    "qwen2.5-7b": ModelConfig(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
        num_kv_heads=4, head_dim=128, rms_norm_eps=1e-6, rope=RopeConfig(theta=1000000.0),
        max_position_embeddings=131072, qkv_bias=True, model_type="qwen2"),
    # HuggingFaceTB/SmolLM2-135M(-Instruct) config.json
    "smollm2-135m": ModelConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
        num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5, rope=RopeConfig(theta=100000.0),
        max_position_embeddings=8192, tie_word_embeddings=True, model_type="llama"),
    # google/flan-t5-large config.json (T5 v1.1: gated-gelu, untied head, no output scaling);
    # compiled by `hilora_jax.t5.aot` (encoder + cross K/V prefill, decoder step)
    "flan-t5-large": T5Config(
        vocab_size=32128, d_model=1024, d_kv=64, d_ff=2816, num_layers=24, num_decoder_layers=24,
        num_heads=16, relative_attention_num_buckets=32, relative_attention_max_distance=128,
        layer_norm_epsilon=1e-6, dense_act_fn="gelu_new", is_gated_act=True,
        tie_word_embeddings=False, scale_decoder_outputs=False, pad_token_id=0,
        eos_token_id=(1,), decoder_start_token_id=0),
}


# ---------------------------------------------------------------------------------------------
# Chips and topologies.
@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    bf16_flops: float  # peak dense bf16 FLOP/s per chip
    hbm_bytes: int  # HBM capacity per chip
    hbm_bw: float  # HBM bytes/s per chip
    ici_bw: float | None  # bidirectional ICI bytes/s per chip (None: not published on the page)
    source: str


# Figures from the Google Cloud TPU documentation, one page per version ("key specifications"):
#   v4:  https://cloud.google.com/tpu/docs/v4   275 TFLOP/s bf16; HBM2 32 GiB, 1200 GB/s (the page
#        gives no per-chip ICI figure, so no ICI time is estimated for v4)
#   v5e: https://cloud.google.com/tpu/docs/v5e  197 TFLOP/s bf16; HBM 16 GiB, 819 GB/s;
#        bidirectional ICI 400 GB/s per chip
#   v5p: https://cloud.google.com/tpu/docs/v5p  459 TFLOP/s bf16; HBM2e 95 GiB, 2765 GB/s;
#        bidirectional ICI 1200 GB/s per chip
#   v6e: https://cloud.google.com/tpu/docs/v6e  918 TFLOP/s bf16; HBM 32 GB, 1640 GB/s;
#        bidirectional ICI 800 GB/s per chip
CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", 275e12, 32 * 2**30, 1200e9, None, "https://cloud.google.com/tpu/docs/v4"),
    "v5e": Chip("v5e", 197e12, 16 * 2**30, 819e9, 400e9, "https://cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip("v5p", 459e12, 95 * 2**30, 2765e9, 1200e9, "https://cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("v6e", 918e12, 32 * 10**9, 1640e9, 800e9, "https://cloud.google.com/tpu/docs/v6e"),
}

# name -> (libtpu topology name, extra arguments, chip). One JAX device per chip (v4 / v5p in
# megacore mode: the two TensorCores of a chip form one device).
TOPOLOGIES: dict[str, tuple[str, dict, str]] = {
    "v4-8": ("v4:2x2x1", {"chip_config_name": "megacore"}, "v4"),
    "v5e-1": ("v5e:1x1", {"chips_per_host_bounds": (1, 1, 1)}, "v5e"),
    "v5e-8": ("v5e:2x4", {}, "v5e"),
    "v5p-8": ("v5p:2x2x1", {"chip_config_name": "megacore"}, "v5p"),
    "v6e-1": ("v6e:1x1", {"chips_per_host_bounds": (1, 1, 1)}, "v6e"),
    "v6e-8": ("v6e:2x4", {}, "v6e"),
}
LOCAL = "local"

ROUTERS = ("base", "oracle", "arrow", "hilora", "hilora-gathered", "hilora-dense")


def topology_devices(topology: str) -> tuple[list, Chip | None]:
    """Devices of a TPU topology (compile-only, via libtpu) or of this process (`local`)."""
    if topology == LOCAL:
        return list(jax.devices()), None
    if topology not in TOPOLOGIES:
        raise AotError(f"unknown topology {topology!r}; choose from "
                       f"{', '.join([*TOPOLOGIES, LOCAL])}")
    from jax._src import hardware_utils
    from jax.experimental import topologies

    if hardware_utils.num_available_tpu_chips_and_device_id()[0] == 0:  # not a TPU VM
        # compile-only use: no metadata server, quiet defaults, and no claim on the libtpu
        # lockfile (other JAX processes on this host may hold it without using a TPU)
        for k, v in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_WORKER_HOSTNAMES", "localhost"),
                     ("TPU_ACCELERATOR_TYPE", "v5litepod-8"), ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
            os.environ.setdefault(k, v)
    name, kw, chip = TOPOLOGIES[topology]
    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=name, **kw)
    except Exception as e:  # libtpu missing or unable to describe the slice
        raise RuntimeError(f"libtpu could not describe topology {topology} ({name}): {e}. "
                           "Install the pinned libtpu (pip install -c constraints.txt "
                           "'.[aot]').") from e
    return list(desc.devices), CHIPS[chip]


# ---------------------------------------------------------------------------------------------
# Inputs.
def model_config(model: str | None = None, preset: str | None = None) -> tuple[str, ModelConfig]:
    """`(name, ModelConfig)` from a preset, a HF `config.json` (file or dir) or a converted dir."""
    if (model is None) == (preset is None):
        raise AotError("give exactly one of --model SRC or --preset NAME")
    if preset is not None:
        if preset not in PRESETS:
            raise AotError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
        return preset, PRESETS[preset]
    p = Path(model).expanduser()
    if p.is_dir() and (p / "hilora_model.json").exists():
        from hilora_jax.io.checkpoint import read_meta

        return p.name, ModelConfig.from_dict(read_meta(p)["config"])
    cfg_file = p / "config.json" if p.is_dir() else p
    if not cfg_file.is_file() or cfg_file.suffix != ".json":
        raise AotError(f"--model {model}: not a HF config.json, a directory holding one, or a "
                       "converted hilora-jax directory")
    try:
        if json.loads(cfg_file.read_text()).get("model_type") == "t5":
            return p.name, T5Config.from_hf_config(cfg_file)
        return p.name, ModelConfig.from_hf_config(cfg_file)
    except (KeyError, json.JSONDecodeError) as e:
        raise AotError(f"--model {cfg_file}: unreadable config ({e})") from None


def parse_mesh(mesh: str | None, n_devices: int, cfg: ModelConfig, batch: int) -> tuple[int, int]:
    """`DATAxMODEL` (default `1xN`: tensor parallel over every device), checked against the model."""
    if mesh is None:
        data, model = 1, n_devices
    else:
        m = re.fullmatch(r"(\d+)x(\d+)", mesh.strip().lower())
        if not m:
            raise AotError(f"--mesh {mesh!r}: expected DATAxMODEL, e.g. 1x8")
        data, model = int(m.group(1)), int(m.group(2))
    if data * model != n_devices:
        raise AotError(f"mesh {data}x{model} uses {data * model} devices; the target has "
                       f"{n_devices}")
    for what, n in (("num_attention_heads", cfg.num_heads), ("num_key_value_heads",
                                                              cfg.num_kv_heads)):
        if n % model:
            raise AotError(f"mesh {data}x{model}: the model axis ({model}) does not divide "
                           f"{what}={n}; choose a model axis that divides {cfg.num_kv_heads}")
    if batch % data:
        raise AotError(f"mesh {data}x{model}: the data axis ({data}) does not divide batch {batch}")
    return data, model


@dataclasses.dataclass(frozen=True)
class PoolSpec:
    """A synthetic pool (`n` adapters of rank `rank` on `targets`) or a saved pool dir."""

    n: int = 50
    rank: int = 8
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    path: str | None = None


def _sds(shape, dtype, sharding=None):
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype), sharding=sharding)


def pool_dir_arrays(path: str, cfg) -> tuple[Any, dict]:
    """The stacked arrays of a saved pool dir as `PoolArrays` of `ShapeDtypeStruct`s (no
    sharding), from its `pool.json` alone (no array is read), checked against the model config
    (Llama or T5: `lora.io.check_pool_fits`), and the pool's description. Bad metadata, or a pool
    of another family or size, is an `AotError` naming the pool dir."""
    from hilora_jax.io.peft import AdapterError
    from hilora_jax.lora.io import POOL_META, _unflat, check_pool_fits
    from hilora_jax.model.projections import projection

    meta_file = Path(path) / POOL_META
    try:
        meta = json.loads(meta_file.read_text())
        arrays = _unflat({k: _sds(v["shape"], v["dtype"]) for k, v in meta["arrays"].items()})
    except (OSError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise AotError(f"--pool {path}: unreadable pool metadata {meta_file} ({e})") from None
    if not arrays.A or set(arrays.A) != set(arrays.B):
        raise AotError(f"--pool {path}: {meta_file} lists no LoRA modules, or A and B disagree")
    try:
        check_pool_fits(arrays, cfg, f"--pool {path}")
    except AdapterError as e:
        raise AotError(f"{e}: the pool does not fit the model") from None
    return arrays, {"path": str(path), "n": arrays.num_adapters,
                    "rank": max(a.shape[2] for a in arrays.A.values()),
                    "targets": list(dict.fromkeys(projection(m).target for m in arrays.modules))}


def place_pool(arrays, desc: dict, mesh: Mesh):
    """`arrays` (`ShapeDtypeStruct`s) on the pool's shardings (`lora.pool.pool_shardings`), and
    `desc` with their total bytes."""
    from hilora_jax.lora.pool import pool_shardings

    sh = pool_shardings(arrays, mesh)
    arrays = jax.tree.map(lambda a, s: _sds(a.shape, a.dtype, s), arrays, sh)
    return arrays, {**desc, "bytes": int(sum(_nbytes(a) for a in jax.tree.leaves(arrays)))}


def abstract_pool(spec: PoolSpec, cfg: ModelConfig, dtype, mesh: Mesh):
    """`PoolArrays` of `ShapeDtypeStruct`s with the pool's shardings, and its description."""
    from hilora_jax.lora.pool import PoolArrays

    shapes = cfg.module_shapes()
    L = cfg.num_layers
    if spec.path is not None:
        arrays, desc = pool_dir_arrays(spec.path, cfg)
    else:
        bad = [t for t in spec.targets if t not in MODULES]
        if bad or not spec.targets:
            raise AotError(f"--targets {','.join(spec.targets)}: unknown module(s) {bad}; "
                           f"choose from {','.join(MODULES)}")
        if spec.n < 1 or spec.rank < 1:
            raise AotError(f"--pool-size {spec.n} / --rank {spec.rank}: both must be >= 1")
        n, r = spec.n, spec.rank
        arrays = PoolArrays(
            A={m: _sds((L, n, r, shapes[m][0]), dtype) for m in spec.targets},
            B={m: _sds((L, n, r, shapes[m][1]), dtype) for m in spec.targets},
            scale={m: _sds((L, n, r), jnp.float32) for m in spec.targets},
            mask={m: _sds((L, n, r), bool) for m in spec.targets},
            ranks=_sds((n,), jnp.int32), active=_sds((n,), bool))
        desc = {"path": None, "n": n, "rank": r, "targets": list(spec.targets)}
    return place_pool(arrays, desc, mesh)


def _target_backend(mesh: Mesh) -> str:
    return mesh.devices.flat[0].platform


def _rows_sharding(mesh: Mesh, spec) -> NamedSharding:
    """The sharding of a per-row vector `[P]` beside rows `[P, D]` laid out by `spec`."""
    return NamedSharding(mesh, P(tuple(spec)[0] if len(spec) else None))


def abstract_pack(arrays, mesh: Mesh, weights: str | None = None):
    """The `RocPack` that `routing.hooks.pack_rocs` builds on the host, as `ShapeDtypeStruct`s:
    every ROC of the (synthetic or shapes-only) pool counted valid, i.e. each adapter at its
    padded rank in one rank group (an upper bound for a real pool with mixed ranks). Packed A
    `[P_key, D]` and B `[P, E]` carry the rules table's axes ("rocs", the projection's in/out
    axis); per-ROC weights and validity are replicated. `weights="int8"`: int8 A/B with float32
    per-ROC scales (`RocPack`), each scale sharded as its rows' ROC axis."""
    from hilora_jax.routing.hooks import RocPack, input_layout

    rep = shd.replicated(mesh)
    q8 = weights == "int8"
    A, B, W, V, groups = {}, {}, {}, {}, []
    a_sc, b_sc = ({}, {}) if q8 else (None, None)
    p_of = {}
    for m in arrays.modules:
        L, n, r, _ = arrays.A[m].shape
        e = arrays.B[m].shape[-1]
        p_of[m] = n * r
        spec = shd.logical_to_spec(("rocs", projection(m).out_axis), (n * r, e), mesh)
        B[m] = [_sds((n * r, e), jnp.int8 if q8 else arrays.B[m].dtype,
                     NamedSharding(mesh, spec))] * L
        if q8:
            b_sc[m] = [_sds((n * r,), jnp.float32, _rows_sharding(mesh, spec))] * L
        W[m] = [_sds((n * r,), jnp.float32, rep)] * L
        V[m] = [_sds((n * r,), bool, rep)] * L
        groups.append((m, ((r, tuple(range(n))),)))
    inputs = input_layout(p_of, arrays.modules)
    for m, members in inputs:
        p = sum(pm for _, _, pm in members)
        L, _, _, d = arrays.A[m].shape
        spec = shd.logical_to_spec(("rocs", projection(m).in_axis), (p, d), mesh)
        A[m] = [_sds((p, d), jnp.int8 if q8 else arrays.A[m].dtype, NamedSharding(mesh, spec))] * L
        if q8:
            a_sc[m] = [_sds((p,), jnp.float32, _rows_sharding(mesh, spec))] * L
    return RocPack(A=A, B=B, w=W, valid=V, groups=tuple(groups), inputs=inputs,
                   A_scale=a_sc, B_scale=b_sc)


def abstract_hook(router: str, arrays, batch: int, mesh: Mesh, max_candidates: int = 8,
                  pack_weights: str | None = None):
    """The router's hook pytree with abstract decisions (`None` for `base`), and the adapters per
    row it reads (for the decode step's minimum bytes). `pack_weights`: the `hilora` (auto)
    hook's pack format (`HiLoRARouter(pack_weights=)`)."""
    from hilora_jax.lora.pool import GatedHook
    from hilora_jax.routing.hooks import ArrowHook, HiLoRAHook

    n = arrays.num_adapters
    rows = shd.batch_sharding(mesh, (batch, 1))
    rep = shd.replicated(mesh)
    if router == "base":
        return None, 0
    if router == "oracle":  # one named adapter per row (trim_slots -> 1 slot)
        return GatedHook(arrays, _sds((batch, 1), jnp.float32, rows),
                         idx=_sds((batch, 1), jnp.int32, rows)), min(n, batch)
    if router == "arrow":  # per-token top-k over the whole pool
        protos = {}
        for m in arrays.A:
            L, A, _, d = arrays.A[m].shape
            spec = shd.logical_to_spec(("layers", "adapters", projection(m).in_axis),
                                       (L, A, d), mesh)
            protos[m] = _sds((L, A, d), jnp.float32, NamedSharding(mesh, spec))
        return ArrowHook(arrays, protos, top_k=3), n
    if router in ("hilora", "hilora-gathered", "hilora-dense"):
        c = min(max_candidates, n)
        strategy = {"hilora": "auto", "hilora-gathered": "gathered", "hilora-dense": "dense"}[router]
        hook = HiLoRAHook(arrays, _sds((batch, c), jnp.int32, rows), _sds((batch, c), bool, rows),
                          _sds((batch, c), jnp.int32, rows), _sds((batch,), jnp.float32, rep),
                          strategy=strategy, backend=_target_backend(mesh))
        if strategy == "auto":  # as HiLoRAHook.prepared() on the host: pack + folded decisions
            hook = hook.replace(pack=abstract_pack(arrays, mesh, pack_weights))
            args = jax.eval_shape(lambda h: h._packed_inputs(), hook)
            hook = hook.replace(packed_args={
                m: tuple([_sds(a.shape, a.dtype, rep if i == 1 else
                               shd.batch_sharding(mesh, a.shape)) for a in part]
                         for i, part in enumerate(parts)) for m, parts in args.items()})
        return hook, min(n, batch * c)
    raise AotError(f"unknown router {router!r}; choose from {', '.join(ROUTERS)} or all")


def abstract_params(cfg: ModelConfig, dtype, mesh: Mesh, weights: str | None = None):
    """Graph definition and state of the model with `ShapeDtypeStruct` leaves on their shardings.

    `weights="int8"`: the base kernels are int8 with float32 per-output-channel scales; `"int4"`:
    4-bit codes with float16 scale and min per 32 inputs (`hilora_jax.model.quant.quantize_model`,
    traced abstractly), each on its rules-table sharding (a scale takes its kernel's output axis,
    int4's groups its input axis)."""
    from hilora_jax.io.hf import _path_str, abstract_model

    if weights in ("int8", "int4"):
        from hilora_jax.model.quant import abstract_quantized_model

        graphdef, state, _ = abstract_quantized_model(cfg, dtype, weights)
    else:
        graphdef, state, _ = abstract_model(cfg, dtype)
    for path, var in nnx.to_flat_state(state):
        v = var.get_value()
        p = _path_str(path)
        var.set_value(_sds(v.shape, v.dtype, shd.param_sharding(p, v.shape, mesh)))
    return graphdef, state


# ---------------------------------------------------------------------------------------------
# Analysis of compiled programs.
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "f8e4m3fn": 1, "f8e5m2": 1,
                "s4": 0.5, "u4": 0.5}
_COLL = re.compile(r"=\s*(?P<type>\([^=]*?\)|[a-z0-9]+\[[0-9,]*\][^ ]*)\s+"
                   r"(?P<kind>all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute"
                   r"|ragged-all-to-all|collective-broadcast)(?P<start>-start)?\(")
_SHAPE = re.compile(r"([a-z0-9]+)\[([0-9,]*)\]")


def _itemsize(dtype) -> float:
    """Bytes per element in accelerator memory (4-bit types: two per byte, as TPU/GPU pack them)."""
    dt = jnp.dtype(dtype)
    return 0.5 if dt in (jnp.dtype(jnp.int4), jnp.dtype(jnp.uint4)) else dt.itemsize


def _nbytes(a) -> int:
    return int(math.prod(a.shape) * _itemsize(a.dtype))


def _device_bytes(a) -> int:
    """Bytes of one device's shard of an abstract array with a sharding."""
    shape = a.sharding.shard_shape(a.shape) if a.sharding is not None else a.shape
    return int(math.prod(shape) * _itemsize(a.dtype))


def _shapes(type_str: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(dt, tuple(int(x) for x in dims.split(",") if x))
            for dt, dims in _SHAPE.findall(type_str)]


def collectives(hlo: str) -> list[dict]:
    """Collectives of a compiled HLO module: `{kind, shape, dtype, bytes}` per instruction (async
    `-start` ops counted once, by their largest result; ops inside loops counted once)."""
    out = []
    for line in hlo.splitlines():
        m = _COLL.search(line)
        if not m:
            continue
        shapes = _shapes(m.group("type"))
        if not shapes:
            continue
        dt, dims = max(shapes, key=lambda s: math.prod(s[1]) * _DTYPE_BYTES.get(s[0], 4))
        out.append({"kind": m.group("kind"), "dtype": dt, "shape": list(dims),
                    "bytes": int(math.prod(dims) * _DTYPE_BYTES.get(dt, 4))})
    return out


_INST = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.*?) ([a-z][a-z0-9\-]*)\((.*)$")
_LAYOUT_SHAPE = re.compile(r"([a-z0-9]+)\[([0-9,]*)\](\{[^}]*\})?")
_NO_TRAFFIC = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "copy-done",
               "slice-done", "after-all", "partition-id", "replica-id", "opt-barrier",
               "all-reduce-done", "all-gather-done", "collective-permute-done", "send-done",
               "recv-done", "async-done"}


def _arrays(type_str: str) -> list[tuple[int, bool]]:
    """`(bytes, in_alternate_memory)` of each array in an HLO type (layout `S(n)`, n > 0: on-chip
    memory such as TPU VMEM, not HBM)."""
    out = []
    for dt, dims, lay in _LAYOUT_SHAPE.findall(type_str):
        n = math.prod(int(x) for x in dims.split(",") if x) * _DTYPE_BYTES.get(dt, 4)
        ms = re.search(r"S\((\d+)\)", lay or "")
        out.append((int(n), bool(ms) and ms.group(1) != "0"))
    return out


def _hbm(type_str: str) -> int:
    return sum(n for n, alt in _arrays(type_str) if not alt)


def loop_body(hlo: str) -> str | None:
    """The name of the body computation of the first `while` in a compiled program's HLO."""
    m = re.search(r"while\([^\n]*body=%([\w.\-]+)", hlo)
    return m.group(1) if m else None


def hbm_traffic(hlo: str, computation: str | None = None) -> tuple[int, dict[str, int]]:
    """Estimated HBM bytes one run of a compiled TPU program moves, from its HLO: every kernel of
    the entry computation reads its HBM-resident operands and writes its HBM-resident results;
    in-place updates (aliased operands, e.g. the KV cache write) count only their update; gathers
    and dynamic slices count at most their result per operand; prefetches and evictions between
    HBM and on-chip memory (`copy-start` / `slice-start`) count once. XLA's own "bytes accessed"
    also counts on-chip reads and writes of those copies, so it overstates HBM traffic on TPU.
    A `while` is counted like one kernel reading and writing its carry; its body is not
    descended into: `computation` counts that computation instead of the entry (a while loop's
    body, `loop_body(hlo)`: one iteration). Returns (bytes, by kind)."""
    comps = {m.group(1): m.group(2) for m in
             re.finditer(r"^%(\S+) .*?\{\n(.*?)^\}", hlo, re.S | re.M)}
    if computation is not None:
        if computation not in comps:
            return 0, {}
        entry = "\n" + comps[computation]
    else:
        start = hlo.find("\nENTRY")
        if start < 0:
            return 0, {}
        entry = hlo[start:]
        entry = entry[: entry.find("\n}") if "\n}" in entry else len(entry)]
    types: dict[str, str] = {}
    total, parts = 0, {}
    for line in entry.splitlines()[1:]:
        m = _INST.match(line)
        if not m:
            continue
        name, typ, op, rest = m.groups()
        types[name] = typ
        if op in _NO_TRAFFIC:
            continue
        opnds = [o for o in re.findall(r"%([\w.\-]+)", rest.split("), ")[0]) if o in types]
        if op in ("copy-start", "slice-start"):
            arrs = _arrays(typ)  # slice-start: ((source), slice, ctx); copy-start: (dst, src, ctx)
            b = (arrs[1][0] if op == "slice-start" and len(arrs) > 1
                 else min(n for n, _ in arrs[:2]))
        else:
            called = re.search(r"calls=%([\w.\-]+)", line)
            body = comps.get(called.group(1), "") if called else ""
            gathers = op in ("gather", "dynamic-slice") or " gather(" in body or \
                " dynamic-slice(" in body
            alias = re.search(r'"aliasing_operands":\{"lists":\[\{"indices":\["(\d+)"', line)
            out_b = 0 if alias else _hbm(typ)
            b = out_b
            for i, o in enumerate(opnds):
                if alias and int(alias.group(1)) == i:
                    continue
                ob = _hbm(types[o])
                b += min(ob, sum(n for n, _ in _arrays(typ))) if gathers else ob
            op = "in-place update" if alias else op
        total += b
        parts[op] = parts.get(op, 0) + b
    return int(total), parts


def summarize_collectives(items: list[dict]) -> list[dict]:
    kinds: dict[str, dict] = {}
    for c in items:
        k = kinds.setdefault(c["kind"], {"kind": c["kind"], "count": 0, "bytes": 0})
        k["count"] += 1
        k["bytes"] += c["bytes"]
    return sorted(kinds.values(), key=lambda k: k["kind"])


def weight_shapes(state, pool_arrays) -> set[tuple[int, ...]]:
    """Global shapes (and per-layer / per-adapter slices) of every weight and pool array: an
    all-gather producing one of these gathers weights or the pool."""
    out = set()
    for leaf in jax.tree.leaves(state):
        out.add(tuple(leaf.shape))
    if pool_arrays is not None:
        for field in (pool_arrays.A, pool_arrays.B):
            for a in field.values():
                s = tuple(a.shape)  # L A R D
                out.update({s, s[1:], s[2:]})
    return {s for s in out if len(s) >= 2}


def _cost(compiled) -> dict:
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else {}
    return {"flops": float(ca.get("flops", 0.0)), "bytes": float(ca.get("bytes accessed", 0.0))}


def _memory(compiled) -> dict:
    ma = compiled.memory_analysis()
    mem = {"argument": int(ma.argument_size_in_bytes), "output": int(ma.output_size_in_bytes),
           "alias": int(ma.alias_size_in_bytes), "temp": int(ma.temp_size_in_bytes),
           "code": int(ma.generated_code_size_in_bytes)}
    mem["total"] = mem["argument"] + mem["output"] - mem["alias"] + mem["temp"] + mem["code"]
    return mem


def roofline(flops: float, nbytes: float, coll_bytes: float, chip: Chip | None) -> dict:
    if chip is None:
        return {"compute_s": None, "memory_s": None, "ici_s": None, "roofline_s": None,
                "bound": None}
    t = {"compute_s": flops / chip.bf16_flops, "memory_s": nbytes / chip.hbm_bw,
         "ici_s": (coll_bytes / chip.ici_bw) if chip.ici_bw else None}
    parts = {k: v for k, v in t.items() if v is not None}
    bound = max(parts, key=parts.get)
    return {**t, "roofline_s": parts[bound], "bound": bound.removesuffix("_s")}


def _zeros_like(tree):
    def z(a):
        return jax.device_put(np.zeros(a.shape, a.dtype), a.sharding)
    return jax.tree.map(z, tree)


def _time(compiled, args, donate_cache: bool, reps: int = 5) -> float:
    """Median wall time of the compiled call on zero-filled inputs (local backend only)."""
    args = list(args)
    times = []
    for i in range(reps + 1):
        t0 = time.perf_counter()
        out = compiled(*args)
        jax.block_until_ready(out)
        if i:
            times.append(time.perf_counter() - t0)
        if donate_cache:
            args[2] = out[1]  # the donated cache is replaced by the new one
    return float(np.median(times))


@dataclasses.dataclass
class AotSpec:
    cfg: ModelConfig
    name: str = "model"
    topology: str = "v5e-8"
    mesh: str | None = None
    dtype: str = "bfloat16"
    weights: str | None = None
    pack_weights: str | None = None  # the hilora router's RocPack format: None or "int8"
    pool: PoolSpec = dataclasses.field(default_factory=PoolSpec)
    routers: Sequence[str] = ("base", "hilora")
    batch: int = 8
    prompt: int = 2048
    new: int = 128
    max_candidates: int = 8
    time_local: bool = True


def check_spec(spec: AotSpec) -> None:
    """Input errors, before any compilation (each one line naming the bad value)."""
    if spec.weights not in (None, "none", "bf16", "bfloat16", "float32", "fp32", "int8", "int4"):
        raise AotError(f"--weights {spec.weights!r}: unknown; choose int8 or int4 (or omit it "
                       "for --dtype weights)")
    if spec.weights == "int4" and not isinstance(spec.cfg, T5Config):
        from hilora_jax.model.quant import WeightsError, check_int4_config

        try:
            check_int4_config(spec.cfg)
        except WeightsError as e:
            raise AotError(f"--weights int4: {str(e).split(': ', 1)[1]}") from None
    if spec.dtype not in ("bfloat16", "float32"):
        raise AotError(f"--dtype {spec.dtype!r}: choose bfloat16 or float32")
    if spec.pack_weights not in (None, "none", "int8"):
        raise AotError(f"--pack-weights {spec.pack_weights!r}: unknown; choose int8 (or omit it "
                       "for the pool's dtype)")
    for r in spec.routers:
        if r not in ROUTERS:
            raise AotError(f"unknown router {r!r}; choose from {', '.join(ROUTERS)} or all")
    for what, v in (("--batch", spec.batch), ("--prompt", spec.prompt), ("--new", spec.new)):
        if v < 1:
            raise AotError(f"{what} {v}: must be >= 1")
    if spec.topology != LOCAL and spec.topology not in TOPOLOGIES:
        raise AotError(f"unknown topology {spec.topology!r}; choose from "
                       f"{', '.join([*TOPOLOGIES, LOCAL])}")
    t = bucket_length(spec.prompt)
    cache = t + bucket_length(spec.new, minimum=16, multiple=64)
    if cache > spec.cfg.max_position_embeddings:
        raise AotError(f"--prompt {spec.prompt} --new {spec.new}: {cache} cache slots exceed the "
                       f"model's max_position_embeddings={spec.cfg.max_position_embeddings}")


def compile_variant(programs: Mapping[str, Callable[[], Any]], *, router: str,
                    chip: Chip | None, hbm: int | None, wshapes, hlo_dir: str | None = None,
                    log=None, finish=None, kept: Mapping[str, dict] | None = None) -> dict:
    """One router's variant of the report: lower and compile each of `programs` (`{name: () ->
    jax.stages.Lowered}`, in order) into an entry (cost, roofline, memory, collectives, weight
    gathers, compile time incl. lowering; `finish(name, entry, compiled)` adds the family's own
    fields before the HBM estimate, `add_hbm_estimate`), the HLO written to `hlo_dir` as
    `{router}_{name}.hlo.txt`. The compiler's out-of-memory verdict is a result: the variant's
    `error` (later programs are skipped). Then its peak bytes, `fits` and margin against `hbm`.
    `kept`: entries of programs compiled earlier for the same spec, taken as they are (a
    benchmark recompiling only the programs a change touched). Shared by the Llama family
    (`analyze`) and T5 (`t5.aot.analyze`)."""
    log = log or (lambda *_: None)
    v: dict[str, Any] = {}
    for prog, lower in programs.items():
        if kept and prog in kept:
            v[prog] = kept[prog]
            log(f"  {router:<13} {prog:<11} kept from an earlier compile")
            continue
        t0 = time.perf_counter()
        lowered = lower()
        try:
            compiled = lowered.compile()
        except Exception as e:  # the compiler's own out-of-memory verdict is a result
            msg = str(e)
            if "RESOURCE_EXHAUSTED" not in msg and "out of memory" not in msg.lower():
                raise
            v["error"] = f"{prog}: " + msg.strip().splitlines()[0][:300]
            log(f"  {router:<13} {prog:<11} does not fit: {v['error']}")
            break
        secs = time.perf_counter() - t0
        hlo = compiled.as_text()
        if hlo_dir is not None:
            Path(hlo_dir).mkdir(parents=True, exist_ok=True)
            (Path(hlo_dir) / f"{router}_{prog}.hlo.txt").write_text(hlo)
        colls = collectives(hlo)
        cost = _cost(compiled)
        coll_bytes = float(sum(c["bytes"] for c in colls))
        entry = {**cost, **roofline(cost["flops"], cost["bytes"], coll_bytes, chip),
                 "memory": _memory(compiled), "collective_bytes": coll_bytes,
                 "collectives": summarize_collectives(colls),
                 "weight_gathers": [c for c in colls if c["kind"] == "all-gather"
                                    and tuple(c["shape"]) in wshapes],
                 "compile_s": round(secs, 2)}
        if finish is not None:
            finish(prog, entry, compiled)
        add_hbm_estimate(entry, hlo, chip)
        log(f"  {router:<13} {prog:<11} compiled in {secs:5.1f}s")
        v[prog] = entry
    if "error" in v:
        v.update(fits=False, peak_bytes=None, margin_bytes=None)
    else:
        peak = max(v[p]["memory"]["total"] for p in programs)
        v.update(peak_bytes=peak, fits=None if hbm is None else bool(peak <= hbm),
                 margin_bytes=None if hbm is None else int(hbm - peak))
    return v


def analyze(spec: AotSpec, *, log=None, hlo_dir: str | None = None,
            keep: Mapping[str, Mapping[str, dict]] | None = None) -> dict:
    """Compile prefill and one decode step for every router in `spec.routers` (base first) and
    return the report (see the module docstring; `format_table` prints it). `keep`: `{router:
    {program: entry}}` from an earlier report of the same spec, reused instead of compiled
    (`compile_variant`'s `kept`). A T5 config is compiled by `hilora_jax.t5.aot.analyze` (same
    report)."""
    if isinstance(spec.cfg, T5Config):
        from hilora_jax.t5.aot import analyze as analyze_t5

        if keep:
            raise AotError("keep= is not supported for T5 configs")
        return analyze_t5(spec, log=log, hlo_dir=hlo_dir)
    check_spec(spec)
    log = log or (lambda *_: None)
    cfg = spec.cfg
    dtype = jnp.dtype(spec.dtype)
    devices, chip = topology_devices(spec.topology)
    data, model_ax = parse_mesh(spec.mesh, len(devices), cfg, spec.batch)
    mesh = Mesh(np.asarray(devices).reshape(data, model_ax), (shd.DATA, shd.MODEL))
    routers = ["base", *[r for r in spec.routers if r != "base"]]

    weights = spec.weights if spec.weights in ("int8", "int4") else None
    pack_weights = "int8" if spec.pack_weights == "int8" else None
    graphdef, state = abstract_params(cfg, dtype, mesh, weights)
    pool_arrays, pool_desc = abstract_pool(spec.pool, cfg, dtype, mesh)
    t = bucket_length(spec.prompt)
    cache_size = t + bucket_length(spec.new, minimum=16, multiple=64)
    b = spec.batch
    tok_sh = shd.batch_sharding(mesh, (b, t))
    ids = _sds((b, t), jnp.int32, tok_sh)
    mask = _sds((b, t), bool, tok_sh)
    tok = _sds((b,), jnp.int32, shd.batch_sharding(mesh, (b,)))
    cache = jax.eval_shape(lambda: KVCache.empty(cfg, b, cache_size, dtype))
    cache = jax.tree.map(lambda a, s: _sds(a.shape, a.dtype, s), cache,
                         kv_cache_sharding(mesh, cache))

    weights_dev = sum(_device_bytes(a) for a in jax.tree.leaves(state))
    kv_dev = sum(_device_bytes(a) for a in (*cache.k, *cache.v))
    # an untied embedding table is only gathered (B rows per step), never read whole
    emb = state["model"]["embed_tokens"]["embedding"].get_value()
    emb_unread = 0 if cfg.tie_word_embeddings else \
        _device_bytes(emb) - min(b, cfg.vocab_size) * cfg.hidden_size * dtype.itemsize
    pool_dev = sum(_device_bytes(a) for a in (*pool_arrays.A.values(), *pool_arrays.B.values()))
    hbm = chip.hbm_bytes if chip is not None else _local_hbm(devices[0])
    wshapes = weight_shapes(state, pool_arrays)
    n_dev = len(devices)
    # attention flops of the prefill (QK^T and PV over every cache slot), per device
    attn_flops = 4.0 * b * t * cache_size * cfg.num_heads * cfg.head_dim * cfg.num_layers / n_dev

    variants: dict[str, dict] = {}
    for r in routers:
        hook, slots = abstract_hook(r, pool_arrays, b, mesh, spec.max_candidates, pack_weights)
        # an int8 pack: the slots' ROCs are read as int8 (+ a float32 scale per ROC)
        lora_dev = pool_dev
        if getattr(hook, "pack", None) is not None and hook.pack.weights == "int8":
            lora_dev = sum(_device_bytes(a) for d in (hook.pack.A, hook.pack.B, hook.pack.A_scale,
                                                      hook.pack.B_scale) for v in d.values()
                           for a in v)

        def finish(prog, entry, compiled, hook=hook, slots=slots, lora_dev=lora_dev):
            if prog == "decode_step":
                lora_min = lora_dev * slots / pool_arrays.num_adapters if slots else 0
                entry["min_bytes"] = float(weights_dev - max(emb_unread, 0) + kv_dev + lora_min)
                entry["bytes_over_min"] = entry["bytes"] / entry["min_bytes"]
            else:
                entry["attention_flops"] = attn_flops
                entry["attention_share"] = attn_flops / entry["flops"] if entry["flops"] else None
            if spec.topology == LOCAL and spec.time_local:
                args = (_zeros_like(state), _zeros_like(ids if prog == "prefill" else tok),
                        _zeros_like(mask if prog == "prefill" else cache), _zeros_like(hook))
                entry["measured_s"] = _time(compiled, args, donate_cache=prog == "decode_step")

        programs = {
            "prefill": lambda hook=hook: prefill_jit.lower(graphdef, state, ids, mask, hook,
                                                           cache_size=cache_size, mesh=mesh),
            "decode_step": lambda hook=hook: decode_step_jit_for(_target_backend(mesh)).lower(
                graphdef, state, tok, cache, hook, mesh=mesh)}
        variants[r] = compile_variant(programs, router=r, chip=chip, hbm=hbm, wshapes=wshapes,
                                      hlo_dir=hlo_dir, log=log, finish=finish,
                                      kept=(keep or {}).get(r))

    ratios = compute_ratios(variants)
    main = variants[routers[-1]]
    if "error" in main:
        return {"model": spec.name, "topology": spec.topology, "devices": n_dev,
                "mesh": {"data": data, "model": model_ax}, "dtype": spec.dtype,
                "weights": weights or str(dtype), "pack_weights": pack_weights, "batch": b,
                "prompt": spec.prompt, "new": spec.new, "cache_size": cache_size,
                "pool": pool_desc, "router": routers[-1], "hbm_bytes": hbm,
                "chip": dataclasses.asdict(chip) if chip else {"name": str(devices[0].device_kind)},
                "per_device": {"weights": weights_dev, "kv_cache": kv_dev, "pool": pool_dev,
                       "embedding_not_read": max(emb_unread, 0)},
                "fits": False, "error": main["error"], "margin_bytes": None, "memory": None,
                "prefill": main.get("prefill"), "decode_step": main.get("decode_step"),
                "collectives": [], "variants": variants, "ratios": ratios}
    return {
        "model": spec.name, "topology": spec.topology,
        "chip": dataclasses.asdict(chip) if chip else {"name": str(devices[0].device_kind)},
        "devices": n_dev, "mesh": {"data": data, "model": model_ax}, "dtype": spec.dtype,
        "weights": weights or str(dtype), "pack_weights": pack_weights, "batch": b,
        "prompt": spec.prompt, "new": spec.new,
        "prompt_bucket": t, "cache_size": cache_size, "pool": pool_desc,
        "router": routers[-1], "hbm_bytes": hbm,
        "per_device": {"weights": weights_dev, "kv_cache": kv_dev, "pool": pool_dev,
                       "embedding_not_read": max(emb_unread, 0)},
        "fits": main["fits"], "margin_bytes": main["margin_bytes"],
        "memory": {"prefill": main["prefill"]["memory"],
                   "decode_step": main["decode_step"]["memory"], "peak": main["peak_bytes"]},
        "prefill": main["prefill"], "decode_step": main["decode_step"],
        "collectives": [{**c, "program": p} for p in ("prefill", "decode_step")
                        for c in main[p]["collectives"]],
        "variants": variants, "ratios": ratios,
    }


def add_hbm_estimate(entry: dict, hlo: str, chip: Chip | None) -> dict:
    """Add the HLO-based HBM traffic estimate (`hbm_traffic`) and its roofline to a program's
    entry (which has `flops`, `collective_bytes` and, for a decode step, `min_bytes`)."""
    hbm_est, parts = hbm_traffic(hlo)
    est = roofline(entry["flops"], hbm_est, entry["collective_bytes"], chip)
    entry.update(hbm_bytes_est=float(hbm_est), hbm_parts=parts,
                 roofline_hbm_s=est["roofline_s"], bound_hbm=est["bound"])
    if "min_bytes" in entry:
        entry["hbm_over_min"] = hbm_est / entry["min_bytes"]
    return entry


def compute_ratios(variants: dict) -> dict:
    """Routed / base ratios of every variant that compiled."""
    base = variants["base"]
    out = {}
    for r, v in variants.items():
        if r == "base" or "error" in v or "error" in base:
            continue
        p, d, bp, bd = v["prefill"], v["decode_step"], base["prefill"], base["decode_step"]
        out[r] = {
            "prefill_flops": p["flops"] / bp["flops"], "prefill_bytes": p["bytes"] / bp["bytes"],
            "decode_bytes": d["bytes"] / bd["bytes"],
            "decode_hbm_bytes": _ratio(d.get("hbm_bytes_est"), bd.get("hbm_bytes_est")),
            "prefill_roofline": _ratio(p["roofline_s"], bp["roofline_s"]),
            "decode_roofline": _ratio(d["roofline_s"], bd["roofline_s"]),
            "prefill_roofline_hbm": _ratio(p.get("roofline_hbm_s"), bp.get("roofline_hbm_s")),
            "decode_roofline_hbm": _ratio(d.get("roofline_hbm_s"), bd.get("roofline_hbm_s")),
        }
        if "measured_s" in d:
            out[r]["decode_measured"] = d["measured_s"] / bd["measured_s"]
    return out


def _ratio(a, b):
    return None if a is None or not b else a / b


def _local_hbm(device) -> int | None:
    try:
        stats = device.memory_stats()
    except Exception:  # CPU devices have none
        return None
    return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


# ---------------------------------------------------------------------------------------------
# Output.
def _gib(x) -> str:
    return "-" if x is None else f"{x / 2**30:.2f}"


def _ms(x) -> str:
    return "-" if x is None else f"{x * 1e3:.3f}"


def format_table(rep: dict) -> str:
    lines = [
        f"{rep['model']} {rep['dtype']}"
        f"{' ' + rep['weights'] + ' weights' if rep.get('weights') in ('int8', 'int4') else ''}"
        f"{' int8 LoRA pack' if rep.get('pack_weights') == 'int8' else ''}"
        f" on {rep['topology']} ({rep['devices']} devices, mesh "
        f"{rep['mesh']['data']}x{rep['mesh']['model']}), batch {rep['batch']}, prompt "
        f"{rep['prompt']} (bucket {rep['prompt_bucket']}), cache {rep['cache_size']} slots; pool "
        f"N={rep['pool']['n']} r={rep['pool']['rank']} {','.join(rep['pool']['targets'])}",
        f"per device: HBM {_gib(rep['hbm_bytes'])} GiB; weights {_gib(rep['per_device']['weights'])}"
        f" GiB, KV cache {_gib(rep['per_device']['kv_cache'])} GiB, pool "
        f"{_gib(rep['per_device']['pool'])} GiB",
        "",
        "| router | fits (margin GiB) | peak GiB | prefill ms (bound) | attn share | decode ms (bound) "
        "| decode bytes/min: XLA / HBM est. | decode vs base: XLA / HBM est. "
        "| collectives (decode) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r, v in rep["variants"].items():
        if "error" in v:
            lines.append(f"| {r} | NO (compiler: {v['error'][:80]}) | - | - | - | - | - | - | - |")
            continue
        p, d = v["prefill"], v["decode_step"]
        fits = "-" if v["fits"] is None else ("yes" if v["fits"] else "NO")
        ratio = rep["ratios"].get(r, {}).get("decode_roofline")
        ratio_h = rep["ratios"].get(r, {}).get("decode_roofline_hbm")
        colls = ", ".join(f"{c['kind']} x{c['count']} ({c['bytes'] / 2**20:.1f} MiB)"
                          for c in d["collectives"]) or "none"
        if d["weight_gathers"]:
            colls += f"; {len(d['weight_gathers'])} WEIGHT/POOL ALL-GATHERS"
        meas = f" [measured {d['measured_s'] * 1e3:.2f}]" if "measured_s" in d else ""
        share = "-" if p["attention_share"] is None else f"{p['attention_share'] * 100:.1f}%"
        lines.append(
            f"| {r} | {fits} ({_gib(v['margin_bytes'])}) | {_gib(v['peak_bytes'])} | "
            f"{_ms(p['roofline_s'])} ({p['bound'] or '-'}) | "
            f"{share} | {_ms(d['roofline_s'])} ({d['bound'] or '-'}){meas} | "
            f"{d['bytes_over_min']:.3f} / {d['hbm_over_min']:.3f} | "
            f"{'-' if ratio is None else f'{ratio:.3f}x'} / "
            f"{'-' if ratio_h is None else f'{ratio_h:.3f}x'} | {colls} |")
    return "\n".join(lines)


def add_aot_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="HF config.json (or its dir) or a converted hilora-jax dir")
    src.add_argument("--preset", help=f"published shapes: {', '.join(PRESETS)}")
    p.add_argument("--topology", default="v5e-8", help=f"{', '.join(TOPOLOGIES)} or local")
    p.add_argument("--mesh", default=None, help="DATAxMODEL (default 1xN)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--weights", default=None, help="int8: weight-only int8 base kernels with "
                   "per-channel scales; int4: 4-bit codes with a float16 scale and min per 32 "
                   "inputs (activations, embeddings and the pool in --dtype)")
    p.add_argument("--pack-weights", default=None,
                   help="int8: the hilora router's packed ROCs in int8 with a scale per ROC "
                        "(router option pack_weights=int8); default: the pool's dtype")
    p.add_argument("--pool", default=None, help="a saved pool dir (shapes only are read)")
    p.add_argument("--pool-size", type=int, default=50)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", default=None,
                   help="PEFT target names (default q_proj,v_proj; T5: q,v)")
    p.add_argument("--router", default="hilora",
                   help=f"{', '.join(ROUTERS)} or all (base is always compiled, for ratios)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt", type=int, default=2048)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--max-candidates", type=int, default=8)
    p.add_argument("--json", default=None, help="write the report here")


def spec_from_args(args) -> AotSpec:
    name, cfg = model_config(args.model, args.preset)
    routers = list(ROUTERS) if args.router == "all" else [s for s in args.router.split(",") if s]
    targets = args.targets or ("q,v" if isinstance(cfg, T5Config) else "q_proj,v_proj")
    pool = PoolSpec(n=args.pool_size, rank=args.rank,
                    targets=tuple(s for s in targets.split(",") if s), path=args.pool)
    return AotSpec(cfg=cfg, name=name, topology=args.topology, mesh=args.mesh, dtype=args.dtype,
                   weights=args.weights, pack_weights=args.pack_weights, pool=pool,
                   routers=routers, batch=args.batch,
                   prompt=args.prompt, new=args.new, max_candidates=args.max_candidates)


def cmd_aot(args) -> int:
    # an AotError is a user error: the `hilora` CLI prints it as one line and exits 2
    spec = spec_from_args(args)
    rep = analyze(spec, log=lambda s: print(s, file=sys.stderr))
    print(format_table(rep))
    if args.json:
        from hilora_jax._fs import atomic_file

        with atomic_file(args.json, "w") as f:
            json.dump(rep, f, indent=1)
    return 0
