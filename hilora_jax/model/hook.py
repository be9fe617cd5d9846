"""The LoRA hook protocol: how the model asks for the low-rank delta of a projection.

Every adaptable projection `y = x W` of the model (`hilora_jax.model.projections`) becomes
`y = x W + delta`, where the delta comes from a hook passed as an *argument* of the forward pass
(`CausalLM(..., lora=hook)`), never stored in the model: a new pool, new gates or new routing
decisions are new leaves of the hook pytree and never rebuild or recompile the model.

The model calls `hook.deltas(layer, names, x)` once per activation it projects: `names` are the
projections reading that `x` (q/k/v; o; gate/up; down). A hook answers, per name, `None` (that
projection is not adapted) or `(delta [B, T, E], trace)`, where `trace` is a dict of routing arrays
for this call (ROCs fired per token, Arrow coefficients, ...; `{}` when there is nothing to show).
The model adds the deltas and drops the traces; `Engine.forward(..., trace=True)` collects them.

Hooks subclass `LoraHook` and implement `delta(layer, name, x)`; a hook that gains from seeing a
shared input once (packed HiLoRA: one matmul against the concatenated q/k/v packs) overrides
`deltas` as well. Every hook is a `flax.struct` pytree: arrays are leaves, strategies and
hyper-parameters static fields. Implementations: `lora.pool.GatedHook` (fixed gates, dense or gathered per row),
`routing.hooks` (HiLoRA, roc-fixed, Arrow, fusion), `lora.train.TrainableLora`.
"""

from __future__ import annotations

from collections.abc import Sequence

from jaxtyping import Array


class LoraHook:
    """Base class of the model's LoRA hooks (module docstring)."""

    def delta(self, layer: int, name: str, x: Array) -> tuple[Array, dict] | None:
        """`(delta [B, T, E], trace)` of projection `name` at `layer` for input `x [B, T, D]`, or
        None when this hook does not adapt it."""
        raise NotImplementedError

    def deltas(self, layer: int, names: Sequence[str], x: Array
               ) -> tuple[tuple[Array, dict] | None, ...]:
        """`delta` of every projection in `names`, all reading the same `x`."""
        return tuple(self.delta(layer, n, x) for n in names)

    def __call__(self, layer: int, name: str, x: Array) -> Array | None:
        """The delta alone (None when not adapted)."""
        out = self.delta(layer, name, x)
        return None if out is None else out[0]
