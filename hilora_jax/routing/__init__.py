"""Routing: HiLoRA and its baselines as pure JAX functions and model hooks.

* `gaussian`, `sequence`, `token`: the method's maths over arrays (fitting, selection, top-n).
* `hooks`: per-module hook pytrees (`HiLoRAHook`, `ArrowHook`, `RocFixedHook`, `FusionHook`).
* `routers`: host-side orchestration behind one interface (`build_router(name, pool, ...)`).
"""

from hilora_jax.routing.routers import ROUTERS, Router, Routing, build_router

__all__ = ["ROUTERS", "Router", "Routing", "build_router"]
