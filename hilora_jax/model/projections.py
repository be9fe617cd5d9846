"""The adaptable projections of a model family, in one table, and the shape-letter legend.

Every fact about a projection that LoRA touches lives here, once: its HF/PEFT module name
(`q_proj`), the block holding it (`self_attn` / `mlp`, so its module key is
`model.layers.{l}.{block}.{name}`), the activation it reads (projections reading the same one are
computed together by packed routing), the logical axes of its input and output (sharding of the
base kernel `[in, out]`, and of LoRA A / B after qwix's rule), and its `(d_in, d_out)` as config
attributes. PEFT files (`io.peft`), sharding (`sharding.PARAM_AXES`, `sharding.lora_axes`),
the config (`ModelConfig.module_shapes`), the model's layers, the pool, the routing hooks and the
trainer all read `LLAMA`. T5 (`T5`) is one more tuple of `Projection`s: its rows name the
place (`decoder.EncDecAttention.q`), carry a module-key template and the config attribute of their
layer count (encoder and decoder stacks differ).

Shape-letter legend
-------------------
One legend for every einsum string and shape comment in `hilora_jax` (modules refer here):

* model: B batch, T query tokens, S key slots (cache length), D model width (`hidden_size`),
  F mlp hidden, N query heads, K kv heads, G query heads per kv head (N = K*G), H head dim,
  V vocab, L layers;
* LoRA pool and routing: A adapters (LoRAs in a pool), R rank-one components (ROCs) per adapter
  (padded to the module's max rank), C candidate slots of a sequence, P packed ROCs (all valid
  ROCs of a module, no rank padding), K slots of a sparse mixture / adapters of a rank group;
  inside one projection D is its input dim and E its output dim (`d_in`, `d_out` below);
* embedding space (`routing.gaussian`): E embedding dim, D modelled dim (E, or d' after PCA),
  W width of a low-rank factor.

LoRA layout convention (the pool, the trainer and PEFT files): A is stored as rows `[R, D]`
(PEFT's `lora_A.weight [r, d_in]`), B as rows `[R, E]` (the transpose of PEFT's
`lora_B.weight [d_out, r]`): ROC j of an adapter is the pair (A[j], B[j]); stacked per module as
`[L, A, R, D]` / `[L, A, R, E]` in a pool and `[L, R, D]` / `[L, R, E]` in one trained adapter.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hilora_jax.model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Projection:
    """One adaptable projection (an `nn.Linear` in HF, kernel `[in, out]` here).

    `reads`: the activation it is applied to (projections with the same `reads` share their input);
    `in_axis` / `out_axis`: logical axes (`sharding.RULES`) of its input / output dim;
    `in_dim` / `out_dim`: `ModelConfig` attributes giving `d_in` / `d_out`.
    """

    name: str
    block: str
    reads: str
    in_axis: str
    out_axis: str
    in_dim: str
    out_dim: str
    # module-key template with `{l}` for the layer/block index; "" = the Llama layout
    # `model.layers.{l}.{block}.{name}`. T5 rows: `encoder.block.{l}.layer.0.SelfAttention.q`.
    key: str = ""
    layers_attr: str = "num_layers"  # config attribute giving this row's layer count

    def shape(self, cfg: ModelConfig) -> tuple[int, int]:
        """`(d_in, d_out)` under `cfg`."""
        return int(getattr(cfg, self.in_dim)), int(getattr(cfg, self.out_dim))

    def num_layers(self, cfg) -> int:
        """Layers (blocks) holding this projection under `cfg`."""
        return int(getattr(cfg, self.layers_attr))

    def module_key(self, layer: int) -> str:
        """The HF/PEFT module key in layer `layer` (Llama: `model.layers.{layer}.{block}.{name}`)."""
        if self.key:
            return self.key.format(l=layer)
        return f"model.layers.{layer}.{self.block}.{self.name}"

    @property
    def target(self) -> str:
        """PEFT's target-module name (the key's last component: `q_proj`, `q`, `wi_0`, ...)."""
        return self.module_key(0).rsplit(".", 1)[-1]


# The Llama family (Llama 1/2/3, Mistral, Qwen2/3, SmolLM2), in the order pools store them.
LLAMA: tuple[Projection, ...] = (
    Projection("q_proj", "self_attn", "attn_in", "embed", "q_heads", "hidden_size", "q_size"),
    Projection("k_proj", "self_attn", "attn_in", "embed", "kv_heads", "hidden_size", "kv_size"),
    Projection("v_proj", "self_attn", "attn_in", "embed", "kv_heads", "hidden_size", "kv_size"),
    Projection("o_proj", "self_attn", "attn_out", "q_heads", "embed", "q_size", "hidden_size"),
    Projection("gate_proj", "mlp", "mlp_in", "embed", "mlp", "hidden_size", "intermediate_size"),
    Projection("up_proj", "mlp", "mlp_in", "embed", "mlp", "hidden_size", "intermediate_size"),
    Projection("down_proj", "mlp", "mlp_hidden", "mlp", "embed", "intermediate_size",
               "hidden_size"),
)


def _t5_rows() -> tuple[Projection, ...]:
    """T5 / FLAN-T5 (`T5ForConditionalGeneration`): one row per projection kind and place, named
    `{stack}.{block}.{proj}` (the pool key; the block index is the hook's layer). Both FFN layouts
    are listed (`wi` of v1.0, `wi_0`/`wi_1` of v1.1); `hilora_jax.t5.projections.projections(cfg)`
    keeps the config's. Cross-attention k/v read the encoder output (`enc_out`)."""
    rows = []
    places = (("encoder", "SelfAttention", 0, "enc_attn", "num_layers"),
              ("decoder", "SelfAttention", 0, "dec_attn", "num_decoder_layers"),
              ("decoder", "EncDecAttention", 1, "cross_attn", "num_decoder_layers"))
    for stack, block, li, reads, n in places:
        for proj, rd, ia, oa, di, do in (
                ("q", f"{reads}_in", "embed", "q_heads", "d_model", "inner_dim"),
                ("k", "enc_out" if block == "EncDecAttention" else f"{reads}_in", "embed",
                 "kv_heads", "d_model", "inner_dim"),
                ("v", "enc_out" if block == "EncDecAttention" else f"{reads}_in", "embed",
                 "kv_heads", "d_model", "inner_dim"),
                ("o", f"{reads}_out", "q_heads", "embed", "inner_dim", "d_model")):
            rows.append(Projection(f"{stack}.{block}.{proj}", block, rd, ia, oa, di, do,
                                   key=f"{stack}.block.{{l}}.layer.{li}.{block}.{proj}",
                                   layers_attr=n))
    for stack, li, n in (("encoder", 1, "num_layers"), ("decoder", 2, "num_decoder_layers")):
        for proj in ("wi", "wi_0", "wi_1", "wo"):
            up = proj != "wo"
            rows.append(Projection(
                f"{stack}.DenseReluDense.{proj}", "DenseReluDense",
                f"{stack}_mlp_in" if up else f"{stack}_mlp_hidden",
                "embed" if up else "mlp", "mlp" if up else "embed",
                "d_model" if up else "d_ff", "d_ff" if up else "d_model",
                key=f"{stack}.block.{{l}}.layer.{li}.DenseReluDense.{proj}", layers_attr=n))
    return tuple(rows)


T5: tuple[Projection, ...] = _t5_rows()

PROJECTIONS: dict[str, Projection] = {p.name: p for p in LLAMA}
# Every family's rows by pool key (`projection()` and the pool's sharding read it).
ALL_PROJECTIONS: dict[str, Projection] = {**PROJECTIONS, **{p.name: p for p in T5}}
MODULES: tuple[str, ...] = tuple(p.name for p in LLAMA)
BLOCKS: tuple[str, ...] = tuple(dict.fromkeys(p.block for p in LLAMA))


def projection(name: str) -> Projection:
    """The table entry of projection `name` (KeyError naming the known ones)."""
    try:
        return ALL_PROJECTIONS[name]
    except KeyError:
        raise KeyError(f"{name!r} is not an adaptable projection (known: {', '.join(MODULES)}; "
                       "T5 rows like 'encoder.SelfAttention.q')") from None


def family_table(cfg) -> tuple[Projection, ...]:
    """The adaptable projections of a model config: `cfg.projections()` when the config has it
    (T5), else the Llama table."""
    rows = getattr(cfg, "projections", None)
    return tuple(rows()) if callable(rows) else LLAMA


def pool_module_order(names) -> tuple[str, ...]:
    """Pool keys in table order (Llama, then T5) and unknown ones sorted last."""
    names = set(names)
    known = [p.name for p in (*LLAMA, *T5) if p.name in names]
    return tuple(known) + tuple(sorted(names - set(known)))


def module_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """`(d_in, d_out)` of every adaptable projection, by name."""
    return {p.name: p.shape(cfg) for p in LLAMA}


def shared_input_groups() -> tuple[tuple[str, ...], ...]:
    """Projections that read the same activation, in table order (Llama q/k/v, gate/up; T5
    self-attention q/k/v, cross-attention k/v, wi/wi_0/wi_1 of each stack); singletons left out."""
    groups: dict[str, list[str]] = {}
    for p in (*LLAMA, *T5):
        groups.setdefault(p.reads, []).append(p.name)
    return tuple(tuple(g) for g in groups.values() if len(g) > 1)
