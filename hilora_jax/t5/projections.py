"""The T5 projection table: every adaptable projection with its block, logical axes and dims.

One row per projection *kind* (`q`, `k`, `v`, `o` of the three attention blocks, `wi` or
`wi_0`/`wi_1` and `wo` of the feed-forward), naming the HF module path pattern (the key PEFT
uses), the logical axes of its input and output side (the sharding rules table's names: LoRA A
inherits the input axis, B the output axis) and its `(d_in, d_out)` from the config. The same
table gives the parameter sharding of the whole model (`param_logical_axes`).
"""

from __future__ import annotations

import dataclasses
import re

from hilora_jax.t5.config import T5Config

ATTENTION_BLOCKS = {
    # block name -> (stack, layer index inside the T5Block)
    "SelfAttention": (("encoder", 0), ("decoder", 0)),
    "EncDecAttention": (("decoder", 1),),
}


@dataclasses.dataclass(frozen=True)
class Projection:
    name: str  # PEFT target name: q k v o wi wi_0 wi_1 wo
    stack: str  # encoder | decoder
    block: str  # SelfAttention | EncDecAttention | DenseReluDense
    layer: int  # index in T5Block.layer
    in_axis: str
    out_axis: str
    d_in: int
    d_out: int

    def path(self, i: int) -> str:
        """HF module path of this projection in block `i` (e.g. `decoder.block.2.layer.1.EncDecAttention.q`)."""
        return f"{self.stack}.block.{i}.layer.{self.layer}.{self.block}.{self.name}"

    @property
    def pattern(self) -> str:
        return rf"{self.stack}\.block\.(\d+)\.layer\.{self.layer}\.{self.block}\.{self.name}"


def projections(cfg: T5Config) -> list[Projection]:
    """Every adaptable projection kind of this config (FFN names follow `is_gated_act`)."""
    d, inner, f = cfg.d_model, cfg.inner_dim, cfg.d_ff
    out: list[Projection] = []
    for block, places in ATTENTION_BLOCKS.items():
        for stack, layer in places:
            out += [Projection("q", stack, block, layer, "embed", "q_heads", d, inner),
                    Projection("k", stack, block, layer, "embed", "kv_heads", d, inner),
                    Projection("v", stack, block, layer, "embed", "kv_heads", d, inner),
                    Projection("o", stack, block, layer, "q_heads", "embed", inner, d)]
    ffn_in = ("wi_0", "wi_1") if cfg.is_gated_act else ("wi",)
    for stack, layer in (("encoder", 1), ("decoder", 2)):
        out += [Projection(n, stack, "DenseReluDense", layer, "embed", "mlp", d, f) for n in ffn_in]
        out.append(Projection("wo", stack, "DenseReluDense", layer, "mlp", "embed", f, d))
    return out


def num_blocks(cfg: T5Config, stack: str) -> int:
    return cfg.num_layers if stack == "encoder" else cfg.num_decoder_layers


def module_shapes(cfg: T5Config) -> dict[str, tuple[int, int]]:
    """`(d_in, d_out)` of every adaptable module, by full HF module path."""
    return {p.path(i): (p.d_in, p.d_out) for p in projections(cfg)
            for i in range(num_blocks(cfg, p.stack))}


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
