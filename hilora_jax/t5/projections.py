"""The T5 projection table: every adaptable projection with its block, logical axes and dims.

The rows are the shared `hilora_jax.model.projections.Projection` type (table `T5` there): one
row per projection kind and place (`q`, `k`, `v`, `o` of encoder self-attention, decoder
self-attention and `EncDecAttention`; `wi` or `wi_0`/`wi_1` and `wo` of each feed-forward), named
`{stack}.{block}.{proj}` (the pool key), with the HF module-key template (the key PEFT uses), the
logical axes of its input and output side (LoRA A inherits the input axis, B the output axis) and
its `(d_in, d_out)` as config attributes. `PARAM_AXES` below gives the parameter sharding of the
whole model (`param_logical_axes`).
"""

from __future__ import annotations

import re

from hilora_jax.model.projections import T5, Projection
from hilora_jax.t5.config import T5Config

_GATED = {"wi": False, "wi_0": True, "wi_1": True}


def projections(cfg: T5Config) -> tuple[Projection, ...]:
    """Every adaptable projection row of this config (`hilora_jax.model.projections.T5`, the
    FFN rows following `is_gated_act`), in table order."""
    return tuple(p for p in T5 if _GATED.get(p.target, cfg.is_gated_act) == cfg.is_gated_act)


def num_blocks(cfg: T5Config, stack: str) -> int:
    return cfg.num_layers if stack == "encoder" else cfg.num_decoder_layers


def module_shapes(cfg: T5Config) -> dict[str, tuple[int, int]]:
    """`(d_in, d_out)` of every adaptable module, by full HF module path."""
    return {p.module_key(i): p.shape(cfg) for p in projections(cfg)
            for i in range(p.num_layers(cfg))}


def module_rows(cfg: T5Config) -> dict[str, tuple[int, str]]:
    """Full HF module path -> `(block index, row name)`: the hook's `(layer, name)` key."""
    return {p.module_key(i): (i, p.name) for p in projections(cfg)
            for i in range(p.num_layers(cfg))}


# parameter path (dot-joined NNX path) -> logical axes; first match wins
PARAM_AXES: list[tuple[str, tuple[str | None, ...]]] = [
    (r"^shared\.embedding$", ("vocab", "embed")),
    (r"\.q\.kernel$", ("embed", "q_heads")),
    (r"\.(k|v)\.kernel$", ("embed", "kv_heads")),
    (r"\.o\.kernel$", ("q_heads", "embed")),
    (r"relative_attention_bias\.embedding$", (None, "q_heads")),
    (r"\.(wi|wi_0|wi_1)\.kernel$", ("embed", "mlp")),
    (r"\.wo\.kernel$", ("mlp", "embed")),
    (r"layer_norm\.weight$", ("norm",)),
    (r"^lm_head\.kernel$", ("embed", "vocab")),
]


def param_logical_axes(path: str) -> tuple[str | None, ...]:
    for pat, axes in PARAM_AXES:
        if re.search(pat, path):
            return axes
    raise KeyError(f"T5 parameter {path!r} matches no entry of hilora_jax.t5.projections.PARAM_AXES")
