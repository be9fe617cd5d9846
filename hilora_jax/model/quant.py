"""Weight-only int8 for the Llama family: `quantize_model(model)` and `load_model(..., weights="int8")`.

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

Memory: `quantize_model` converts one kernel at a time, in place, so loading peaks at the model
in its dtype plus one kernel, and ends at about half (bf16) or a quarter (fp32) of the kernels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding
from jaxtyping import Array

from hilora_jax.errors import HiloraUserError
from hilora_jax.model import sharding as shd
from hilora_jax.model.projections import LLAMA

WEIGHTS = ("int8",)  # weight formats besides the model dtype (None / "none")
QMAX = 127


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


def _shardings(path: str, kernel):
    """Rules-table shardings of `path.kernel` / `path.scale` on the kernel's mesh (None: none)."""
    sh = getattr(kernel, "sharding", None)
    if not isinstance(sh, NamedSharding):
        return None
    mesh = sh.mesh
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


def is_quantized(model) -> bool:
    return any(isinstance(getattr(parent, attr), Int8Linear)
               for _, parent, attr in linear_paths(model))


def quantize_model(model, weights: str = "int8"):
    """Replace every base `Linear` of a `CausalLM` by an `Int8Linear`, in place; returns the model.

    Sharded kernels keep the rules-table shardings (the scale gets the kernel's output axis).
    Works on an abstract model too (inside `nnx.eval_shape`). Already-int8 layers are left alone.
    """
    check_weights(weights)
    for path, parent, attr in linear_paths(model):
        lin = getattr(parent, attr)
        if isinstance(lin, Int8Linear):
            continue
        kernel = lin.kernel[...]
        bias = None if lin.bias is None else lin.bias[...]
        shs = _shardings(path, kernel)
        fn = jax.jit(quantize_int8, out_shardings=shs) if shs is not None else quantize_int8
        q, scale = fn(kernel)
        setattr(parent, attr, Int8Linear(q, scale, bias))
        del kernel, lin
    return model


def abstract_int8_model(cfg, dtype=jnp.float32):
    """`(graphdef, state, {path: ShapeDtypeStruct})` of an int8 `CausalLM`, allocating nothing."""
    from hilora_jax.model.llama import CausalLM

    abs_model = nnx.eval_shape(lambda: quantize_model(CausalLM(cfg, dtype=dtype,
                                                               rngs=nnx.Rngs(0))))
    graphdef, state = nnx.split(abs_model)
    flat = {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(state)}
    return graphdef, state, flat
