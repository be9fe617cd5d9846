"""Sharding: one logical-axis rules table, mesh presets, and constrain helpers.

Weights and activations carry *logical* axis names; `RULES` maps each to a mesh axis (maxtext's
`logical_axis_rules`). The mesh has two axes: `data` (batch) and `model` (tensor parallel:
heads, mlp hidden, vocab). LoRA pools follow qwix's rule: A inherits its base kernel's input-side
axis, B the output side, and the ROC/adapter axes are replicated.

A dimension that the mesh axis does not divide is replicated instead (JAX requires even
division); `param_sharding` reports such fallbacks through `fallbacks` so tests can assert the
table was applied, and `strict=True` turns them into errors.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from hilora_jax.model.projections import LLAMA, projection

DATA, MODEL = "data", "model"

# logical axis -> mesh axis (None = replicated). Weights first, then activations.
RULES: dict[str, str | None] = {
    # weights
    "vocab": MODEL,
    "embed": None,
    "q_heads": MODEL,
    "kv_heads": MODEL,
    "mlp": MODEL,
    "norm": None,
    "layers": None,
    "adapters": None,
    "rocs": None,
    # activations
    "batch": DATA,
    "seq": None,
    "act_embed": None,
    "act_vocab": MODEL,
}

# parameter path (dot-joined NNX path) -> logical axes, first match wins; the adaptable
# projections' kernels `[in, out]` and biases `[out]` come from the projection table
PARAM_AXES: list[tuple[str, tuple[str, ...]]] = [
    (r"embed_tokens\.embedding$", ("vocab", "embed")),
    *[(rf"{p.name}\.kernel$", (p.in_axis, p.out_axis)) for p in LLAMA],
    *[(rf"{p.name}\.bias$", (p.out_axis,)) for p in LLAMA],
    # weight-only int8 (`hilora_jax.model.quant`): the per-output-channel scale follows the output
    *[(rf"{p.name}\.scale$", (p.out_axis,)) for p in LLAMA],
    # weight-only int4: codes [in / 32, 32, out] and float16 pairs [in / 32, out] per group
    *[(rf"{p.name}\.kernel4$", (p.in_axis, None, p.out_axis)) for p in LLAMA],
    *[(rf"{p.name}\.group_(scale|min)$", (p.in_axis, p.out_axis)) for p in LLAMA],
    (r"(norm|layernorm)\.weight$", ("norm",)),
    (r"lm_head\.kernel$", ("embed", "vocab")),
    (r"lm_head\.scale$", ("vocab",)),
    (r"lm_head\.kernel4$", ("embed", None, "vocab")),
    (r"lm_head\.group_(scale|min)$", ("embed", "vocab")),
]

ACT_AXES = {
    "act": ("batch", "seq", "act_embed"),
    "logits": ("batch", "seq", "act_vocab"),
    "tokens": ("batch", "seq"),
}


def make_mesh(data: int | None = None, model: int | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `(data, model)` mesh. With one size given the other fills the devices; neither: all data."""
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    if data is None and model is None:
        data, model = n, 1
    elif data is None:
        data = n // model
    elif model is None:
        model = n // data
    if data * model != n:
        raise ValueError(f"mesh {data}x{model} does not use the {n} available devices")
    return Mesh(np.asarray(devices).reshape(data, model), (DATA, MODEL))


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None, *, strict: bool = False,
                    what: str = "array", fallbacks: list | None = None) -> PartitionSpec:
    """Map logical axes to a `PartitionSpec`, replicating dims the mesh axis does not divide."""
    out = []
    used = set()
    for i, ax in enumerate(axes):
        mesh_ax = RULES[ax] if ax is not None else None
        if ax is not None and ax not in RULES:
            raise KeyError(f"logical axis {ax!r} has no rule in sharding.RULES")
        if mesh_ax is not None and (mesh_ax in used or (mesh is not None and mesh_ax not in mesh.shape)):
            mesh_ax = None
        if mesh_ax is not None and shape is not None and mesh is not None:
            size = mesh.shape[mesh_ax]
            if shape[i] % size:
                if strict:
                    raise ValueError(f"{what}: dim {i} ({ax}={shape[i]}) is not divisible by mesh "
                                     f"axis {mesh_ax!r} of size {size}")
                if fallbacks is not None:
                    fallbacks.append((what, i, ax, shape[i], size))
                mesh_ax = None
        if mesh_ax is not None:
            used.add(mesh_ax)
        out.append(mesh_ax)
    return PartitionSpec(*out)


def param_logical_axes(path: str, ndim: int) -> tuple[str | None, ...]:
    """Logical axes of a model parameter from its dot-joined path."""
    for pat, axes in PARAM_AXES:
        if re.search(pat, path):
            if len(axes) != ndim:
                raise ValueError(f"parameter {path}: rule {pat!r} gives {len(axes)} axes, "
                                 f"array has {ndim}")
            return axes
    raise KeyError(f"parameter {path!r} matches no entry of sharding.PARAM_AXES")


def param_sharding(path: str, shape: Sequence[int], mesh: Mesh, *, strict: bool = False,
                   fallbacks: list | None = None) -> NamedSharding:
    axes = param_logical_axes(path, len(shape))
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, strict=strict, what=path,
                                               fallbacks=fallbacks))


def lora_axes(module: str, side: str) -> tuple[str | None, ...]:
    """Logical axes of a pool tensor `[L, A, R, d]`: side 'A' (input) or 'B' (output)."""
    p = projection(module)
    return ("layers", "adapters", "rocs", p.in_axis if side == "A" else p.out_axis)


def make_constrain(mesh: Mesh | None):
    """`constrain(x, kind)` for block boundaries; identity only when no mesh is given."""
    if mesh is None:
        return None

    def constrain(x, kind: str):
        spec = logical_to_spec(ACT_AXES[kind], x.shape, mesh)
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

    return constrain


def batch_sharding(mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
    """Shard dim 0 over `data` (when it divides), replicate the rest."""
    axes = ("batch",) + (None,) * (len(shape) - 1)
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def num_devices(mesh: Mesh) -> int:
    return math.prod(mesh.shape.values())
