"""hilora-jax: training-free routing over pools of LoRA adapters (HiLoRA) in pure JAX/Flax.

Front doors:
  load_model(src, dtype=..., mesh=...)    HF dir, hub id, .gguf, converted dir, or "smollm2"
  load_tokenizer(src)
  load_pool(manifest_or_dir, model=...)   PEFT adapters -> stacked LoRA pool
  save_model(model, out, tokenizer=...)   converted (orbax) model dir; save_pool(pool, out)
  Engine(model, mesh=None)                jitted forward / score / generate
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["load_model", "load_tokenizer", "load_pool", "save_model", "save_pool", "Engine",
           "ModelConfig", "__version__"]


def __getattr__(name):  # lazy: importing the package stays cheap
    if name in ("load_model", "load_tokenizer"):
        from hilora_jax import loading

        return getattr(loading, name)
    if name in ("load_pool", "save_pool"):
        from hilora_jax.lora import io

        return getattr(io, name)
    if name == "save_model":
        from hilora_jax.checkpoint import save_model

        return save_model
    if name == "Engine":
        from hilora_jax.inference import Engine

        return Engine
    if name == "ModelConfig":
        from hilora_jax.config import ModelConfig

        return ModelConfig
    raise AttributeError(f"module 'hilora_jax' has no attribute {name!r}")
