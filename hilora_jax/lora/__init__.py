"""LoRA pools: N PEFT adapters stacked per target module as rank-one components (ROCs).

* `pool`: `PoolArrays` (the jit-side pytree), `LoraPool` (arrays + host metadata), the pure gated
  delta `lora_delta`, the model hook `GatedHook`, and `merge_into`.
* `manifest`: pool manifests (JSON/YAML/dict/folder of adapters) with per-adapter samples/clusters.
* `io`: `load_pool` (front door), orbax `save_pool` / `load_pool_dir`, PEFT export, and the CLI entry
  points `convert_pool` / `export_adapter`.
PEFT reading itself lives in `hilora_jax.io.peft`.
"""

from hilora_jax.lora.io import (
    convert_pool,
    export_adapter,
    export_peft,
    load_pool,
    load_pool_dir,
    save_pool,
)
from hilora_jax.lora.manifest import ManifestError, PoolManifest, read_manifest
from hilora_jax.lora.pool import GatedHook, LoraPool, PoolArrays, lora_delta, merge_into

__all__ = [
    "GatedHook", "LoraPool", "ManifestError", "PoolArrays", "PoolManifest", "convert_pool",
    "export_adapter", "export_peft", "load_pool", "load_pool_dir", "lora_delta", "merge_into",
    "read_manifest", "save_pool",
]
