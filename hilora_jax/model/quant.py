"""Weight-only int8 and int4 for the Llama family: `quantize_model(model, weights)` and
`load_model(..., weights="int8" | "int4")`.

Every base `Linear` kernel (the seven adaptable projections of each layer and an untied LM head)
becomes an `Int8Linear`: `kernel` int8 `[in, out]` and `scale` float32 `[out]`, symmetric per
output channel (`scale_j = max_i |W_ij| / 127`, `q = round(W / scale)`, so every weight is
reconstructed within `scale_j / 2`). The matmul dequantises inside: `(x @ q.astype(x.dtype)) *
scale.astype(x.dtype)`, in the model (activation) dtype; XLA fuses the convert into the dot, so a
decode step reads the int8 bytes from memory. Biases, norms and LoRA pools stay in the model dtype;
the HiLoRA router can keep the ROCs its token stage reads every step (its `RocPack`) in int8 as well,
with a scale per ROC (`HiLoRARouter(pack_weights="int8")`, `routing.hooks.pack_rocs`).

Embeddings stay in the model dtype: an embedding lookup reads only the `B x T` rows it gathers,
so quantising the table saves memory but no bandwidth per token, and a tied table also serves as
the LM head, where a per-row (vocab) scale would need a second layout. For Llama-2-7B the table is
0.26 GB of 13.5 GB in bf16.

Why our own module and not qwix (PyPI `qwix==0.1.8`, which installs cleanly beside the pinned
jax/flax): qwix's PTQ provider intercepts `jnp.einsum`/`dot_general` while it traces the model with
sample inputs and replaces each weight by a `WithAux[QArray]` container, so the parameter paths
become `...q_proj.kernel.array.qvalue` / `.scale` instead of HF names, the sharding rules table
(`hilora_jax.model.sharding.PARAM_AXES`) would need entries for its internal layout, and the
interception has to be re-entered inside our own jitted pure functions (`Engine` splits the model
once and merges it in `jax.jit`). Here the model stays a plain NNX module with HF names
(`model.layers[i].self_attn.q_proj.kernel` is the int8 kernel, `.scale` beside it), the rules
table gives the scale the kernel's output axis (`PARAM_AXES`), and `Engine`, `hilora aot` and the
LoRA hooks need no change. (The LoRA merge path `lora.pool.merge_into` refuses int8 kernels.)

GGUF: `read_gguf` dequantises Q8_0 (blocks of 32 input weights with one f16 scale each) to floats;
`weights="int8"` then requantises per output channel. That is not exact (a 32-block scale is finer
than a per-channel one): the round trip error is bounded by the per-channel `scale / 2` above, not
zero; it is exact only where a channel is a single block (32 inputs), as Q8_0's block scale is also
`max |w| / 127`. Keeping the Q8_0 blocks would need a block-scaled matmul; not done here. (The built-in
`smollm2` GGUF stores its projections as Q4_1 and only the embedding as Q8_0, so there the int8
kernels are a per-channel requantisation of the dequantised 4-bit weights, and the embedding stays
in the model dtype.)

Saving: `save_model` records `"weights": "int8"` and `restore_model` rebuilds the int8 layout, so a
converted int8 directory loads straight into int8 (no float copy).

int4 (`weights="int4"`, `Int4Linear`): asymmetric 4-bit codes per group of `GROUP` = 32 input rows
of each output channel, GGUF Q4_1's layout: `w = q * scale + min` with `q` in 0..15 and `scale`,
`min` float16 per group (`quantize_int4`: `min = f16(min_g w)`, `scale = f16((max_g w - min) /
15)`; every weight is reconstructed within `scale / 2` plus the float16 rounding of the pair,
<= 2^-10 max_g |w|). The kernel is stored `[G, 32, out]` (uint4, two codes per byte on TPU/GPU;
XLA:CPU keeps a byte per code), so a decode step reads 0.625 bytes per weight (int8: 1, bf16: 2).
With at most `SPLIT_TOKENS` rows (decode steps) the matmul contracts each group separately,
`sum_g (x_g . q_g) * scale_g + (sum x_g) * min_g`: one convert per weight, the scale and min
applied to the `[rows, G, out]` partial sums. XLA:TPU fuses it so only the codes and the pairs
are read (a `[4096, 11008]` kernel at 1-8 rows: 26.9 MiB per call, vs 86 MiB bf16 and 43 MiB
int8; `hilora aot`'s HBM estimate, libtpu v5e). Longer inputs (prompts) dequantise the kernel
into the activation dtype first; XLA:TPU fuses that into the dot as well up to ~512 rows (the
same bytes, 3x the elementwise work at one row) and writes the dequantised kernel once per call
beyond (4096 rows: 317 MiB, a compute-bound call of 370 GFLOP). The layout matters: codes stored
`[in, out]` and regrouped inside the matmul made XLA:TPU write the bf16 kernel at every size.
The built-in `smollm2` GGUF stores its projections as Q4_1 with this very grid, so `weights=
"int4"` reproduces its weights exactly (the dequantised floats requantise to the same codes,
`scale` and `min`: tested). Input sizes must be multiples of 32 (every published Llama-family
size is); a kernel that is not is refused naming its path. Saved int4 directories store the
codes as uint8 (orbax has no 4-bit type) and restore them to uint4.

Memory: `quantize_model` converts one kernel at a time, in place, so loading peaks at the model
in its dtype plus one kernel, and ends at about half (bf16) or a quarter (fp32) of the kernels.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding
from jaxtyping import Array

from hilora_jax.errors import HiloraUserError
from hilora_jax.model import sharding as shd
from hilora_jax.model.projections import LLAMA

WEIGHTS = ("int8", "int4")  # weight formats besides the model dtype (None / "none")
QMAX = 127
GROUP = 32  # int4: input rows per (scale, min) pair, as GGUF Q4_1
SPLIT_TOKENS = 64  # int4: inputs with at most this many rows contract group by group


class WeightsError(HiloraUserError, ValueError):
    """An unknown `weights=` format (one line naming it)."""


def check_weights(weights: str | None) -> str | None:
    """`None` for the model dtype, else the quantised format; an unknown name raises one line."""
    if weights in (None, "none", ""):
        return None
    if weights not in WEIGHTS:
        raise WeightsError(f"weights={weights!r}: unknown weight format; choose one of "
                           f"{', '.join(WEIGHTS)} (or none for the model dtype)")
    return weights


def quantize_int8(w: Array) -> tuple[Array, Array]:
    """Symmetric per-output-channel int8 of a kernel `[in, out]`: `(q int8 [in, out], scale f32
    [out])` with `|w - q * scale| <= scale / 2` elementwise. An all-zero column gets scale 1."""
    w32 = w.astype(jnp.float32)
    amax = jnp.max(jnp.abs(w32), axis=0)
    scale = jnp.where(amax > 0, amax / QMAX, 1.0).astype(jnp.float32)
    q = jnp.clip(jnp.round(w32 / scale), -QMAX, QMAX).astype(jnp.int8)
    return q, scale


def dequantize_int8(q: Array, scale: Array, dtype=jnp.float32) -> Array:
    return (q.astype(jnp.float32) * scale.astype(jnp.float32)).astype(dtype)


class Int8Linear(nnx.Module):
    """`Linear` with an int8 kernel `[in, out]` and a float32 per-output-channel `scale [out]`."""

    def __init__(self, kernel: Array, scale: Array, bias: Array | None = None):
        self.kernel = nnx.Param(kernel)  # int8 [in, out]
        self.scale = nnx.Param(scale)  # float32 [out]
        self.bias = nnx.Param(bias) if bias is not None else None

    def __call__(self, x: Array) -> Array:
        y = jnp.einsum("...D,DF->...F", x, self.kernel[...].astype(x.dtype))
        y = y * self.scale[...].astype(x.dtype)
        if self.bias is not None:
            y = y + self.bias[...]
        return y

    def dequantized(self, dtype=jnp.float32) -> Array:
        return dequantize_int8(self.kernel[...], self.scale[...], dtype)


def check_int4_config(cfg) -> None:
    """Refuse (one line) a config whose projections' inputs are not multiples of `GROUP`, before
    any weight is read."""
    for p in LLAMA:
        d = cfg.module_shapes()[p.name][0]
        if d % GROUP:
            raise WeightsError(f"weights='int4': {p.name} has {d} inputs, not a multiple of the "
                               f"group size {GROUP}")


def quantize_int4(w: Array, group: int = GROUP) -> tuple[Array, Array, Array]:
    """Asymmetric 4-bit codes of a kernel `[in, out]` per group of `group` input rows (module
    docstring): `(q uint4 [in / group, group, out], scale f16 [G, out], min f16 [G, out])` with
    `w ~ q * scale + min`. A constant group gets scale 1 and codes 0."""
    d, f = w.shape
    if d % group:
        raise WeightsError(f"int4: input size {d} is not a multiple of the group size {group}")
    wg = w.astype(jnp.float32).reshape(d // group, group, f)
    mn = jnp.min(wg, axis=1).astype(jnp.float16)
    span = jnp.max(wg, axis=1) - mn.astype(jnp.float32)
    scale = (span / 15.0).astype(jnp.float16)
    scale = jnp.where(scale > 0, scale, jnp.float16(1.0))  # a constant (or sub-f16) group
    q = jnp.round((wg - mn.astype(jnp.float32)[:, None]) / scale.astype(jnp.float32)[:, None])
    return jnp.clip(q, 0, 15).astype(jnp.uint4), scale, mn


def dequantize_int4(q: Array, scale: Array, mn: Array, dtype=jnp.float32) -> Array:
    """The kernel `[in, out]` of `quantize_int4`'s codes (computed in float32)."""
    g, gs, f = q.shape
    w = q.astype(jnp.float32) * scale.astype(jnp.float32)[:, None] + mn.astype(jnp.float32)[:, None]
    return w.reshape(g * gs, f).astype(dtype)


class Int4Linear(nnx.Module):
    """`Linear` with 4-bit codes `kernel4 [in / 32, 32, out]` (uint4) and float16 `group_scale`,
    `group_min [in / 32, out]` (module docstring)."""

    def __init__(self, kernel4: Array, group_scale: Array, group_min: Array,
                 bias: Array | None = None):
        self.kernel4 = nnx.Param(kernel4)
        self.group_scale = nnx.Param(group_scale)
        self.group_min = nnx.Param(group_min)
        self.bias = nnx.Param(bias) if bias is not None else None

    def __call__(self, x: Array) -> Array:
        q, s, m = self.kernel4[...], self.group_scale[...], self.group_min[...]
        g, gs, f = q.shape
        lead = x.shape[:-1]
        n = math.prod(lead)
        if n <= SPLIT_TOKENS:  # decode: read only the codes and the pairs (module docstring)
            xg = x.reshape(n, g, gs)
            part = jnp.einsum("ngi,gio->ngo", xg, q.astype(x.dtype),
                              preferred_element_type=jnp.float32)
            y = (jnp.einsum("ngo,go->no", part, s.astype(jnp.float32))
                 + jnp.einsum("ng,go->no", jnp.sum(xg, axis=-1, dtype=jnp.float32),
                              m.astype(jnp.float32)))
            y = y.astype(x.dtype).reshape(*lead, f)
        else:
            y = jnp.einsum("...D,DF->...F", x, dequantize_int4(q, s, m, x.dtype))
        if self.bias is not None:
            y = y + self.bias[...]
        return y

    def dequantized(self, dtype=jnp.float32) -> Array:
        return dequantize_int4(self.kernel4[...], self.group_scale[...], self.group_min[...],
                               dtype)


QUANTIZED = {"int8": Int8Linear, "int4": Int4Linear}


def _shardings(path: str, kernel, weights: str):
    """Rules-table shardings of the quantised layer's arrays on the kernel's mesh (None: none):
    int8 `(kernel, scale)`, int4 `(kernel4, group_scale, group_min)`."""
    sh = getattr(kernel, "sharding", None)
    if not isinstance(sh, NamedSharding):
        return None
    mesh = sh.mesh
    d, f = kernel.shape
    if weights == "int4":
        pair = shd.param_sharding(f"{path}.group_scale", (d // GROUP, f), mesh)
        return (shd.param_sharding(f"{path}.kernel4", (d // GROUP, GROUP, f), mesh), pair, pair)
    return (shd.param_sharding(f"{path}.kernel", kernel.shape, mesh),
            shd.param_sharding(f"{path}.scale", kernel.shape[1:], mesh))


def linear_paths(model) -> list[tuple[str, nnx.Module, str]]:
    """`(dotted path, parent module, attribute)` of every base `Linear` of a `CausalLM`."""
    out = []
    for i, layer in enumerate(model.model.layers):
        for p in LLAMA:
            block = getattr(layer, p.block)
            out.append((f"model.layers.{i}.{p.block}.{p.name}", block, p.name))
    if model.lm_head is not None:
        out.append(("lm_head", model, "lm_head"))
    return out


def model_weights(model) -> str | None:
    """The model's weight format: "int8", "int4" or None (kernels in the model dtype)."""
    for _, parent, attr in linear_paths(model):
        for name, cls in QUANTIZED.items():
            if isinstance(getattr(parent, attr), cls):
                return name
    return None


def is_quantized(model) -> bool:
    return model_weights(model) is not None


def quantize_model(model, weights: str = "int8"):
    """Replace every base `Linear` of a `CausalLM` by an `Int8Linear` (`weights="int8"`) or an
    `Int4Linear` (`"int4"`), in place; returns the model.

    Sharded kernels keep the rules-table shardings (a scale gets the kernel's output axis; int4's
    group axis follows the kernel's input axis). Works on an abstract model too (inside
    `nnx.eval_shape`). Layers already in `weights` are left alone; a model quantised to the other
    format is refused. All kernels are checked before any is converted.
    """
    check_weights(weights)
    have = model_weights(model)
    if have not in (None, weights):
        raise WeightsError(f"weights={weights!r}: the model's kernels are already {have}")
    paths = linear_paths(model)
    if weights == "int4":
        for path, parent, attr in paths:
            lin = getattr(parent, attr)
            d = lin.kernel4.get_value().shape[0] * GROUP if isinstance(lin, Int4Linear) else \
                lin.kernel.get_value().shape[0]
            if d % GROUP:
                raise WeightsError(f"weights='int4': {path}.kernel has {d} inputs, not a multiple "
                                   f"of the group size {GROUP}")
    cls, fn0 = (Int4Linear, quantize_int4) if weights == "int4" else (Int8Linear, quantize_int8)
    for path, parent, attr in paths:
        lin = getattr(parent, attr)
        if isinstance(lin, cls):
            continue
        kernel = lin.kernel[...]
        bias = None if lin.bias is None else lin.bias[...]
        shs = _shardings(path, kernel, weights)
        fn = jax.jit(fn0, out_shardings=shs) if shs is not None else fn0
        setattr(parent, attr, cls(*fn(kernel), bias))
        del kernel, lin
    return model


def abstract_quantized_model(cfg, dtype=jnp.float32, weights: str = "int8"):
    """`(graphdef, state, {path: ShapeDtypeStruct})` of a `CausalLM` with `weights` kernels,
    allocating nothing."""
    from hilora_jax.model.llama import CausalLM

    abs_model = nnx.eval_shape(lambda: quantize_model(CausalLM(cfg, dtype=dtype,
                                                               rngs=nnx.Rngs(0)), weights))
    graphdef, state = nnx.split(abs_model)
    flat = {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(state)}
    return graphdef, state, flat
