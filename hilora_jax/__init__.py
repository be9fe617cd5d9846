"""hilora-jax: training-free routing over pools of LoRA adapters (HiLoRA) in pure JAX/Flax.

Front doors:
  load_model(src, dtype=..., mesh=...)    HF dir, hub id, .gguf, converted dir, or "smollm2";
                                          weights="int8" / "int4": weight-only base kernels
  load_tokenizer(src)
  load_pool(manifest_or_dir, model=...)   PEFT adapters -> stacked LoRA pool
  save_model(model, out, tokenizer=...)   converted (orbax) model dir; save_pool(pool, out)
  Engine(model, mesh=None)                jitted forward / score / generate
"""

from __future__ import annotations

__version__ = "0.1.0"


def _quiet_libtpu_off_tpu() -> None:
    """libtpu (the `aot` and `tests` extras) loads with every JAX process. On a host with no TPU
    chip it must never query a cloud metadata server and has no slice to find: give it quiet
    defaults (set only if unset, before any backend starts) so plain CPU/GPU runs print nothing.
    A TPU VM (a Google PCI device, vendor 0x1ae0, as JAX itself checks) is left alone."""
    import glob
    import os

    for f in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(f) as fh:
                if fh.read().strip() == "0x1ae0":
                    return
        except OSError:
            continue
    for k, v in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_WORKER_HOSTNAMES", "localhost"),
                 ("TPU_ACCELERATOR_TYPE", "v5litepod-8"), ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
        os.environ.setdefault(k, v)


_quiet_libtpu_off_tpu()

__all__ = ["load_model", "load_tokenizer", "load_pool", "save_model", "save_pool", "Engine",
           "ModelConfig", "__version__"]


def __getattr__(name):  # lazy: importing the package stays cheap
    if name in ("load_model", "load_tokenizer"):
        from hilora_jax.io import loading

        return getattr(loading, name)
    if name in ("load_pool", "save_pool"):
        from hilora_jax.lora import io

        return getattr(io, name)
    if name == "save_model":
        from hilora_jax.io.checkpoint import save_model

        return save_model
    if name == "Engine":
        from hilora_jax.inference import Engine

        return Engine
    if name == "ModelConfig":
        from hilora_jax.model.config import ModelConfig

        return ModelConfig
    raise AttributeError(f"module 'hilora_jax' has no attribute {name!r}")
