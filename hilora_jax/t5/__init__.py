"""T5 / FLAN-T5 encoder-decoder family: strict config reading, Flax NNX model with HF names,
strict HF loading (safetensors, sharded, pytorch_model.bin), jitted inference (encode once,
cached cross-attention K/V, greedy / sampled generation, choice scoring), PEFT T5 adapters.

Self-contained for now: nothing outside `hilora_jax.t5` imports it yet (the CLI, `Engine`,
pools and routers are Llama-only); see each module's docstring.
"""

from hilora_jax.t5.config import T5Config, read_t5_config
from hilora_jax.t5.generate import T5Engine
from hilora_jax.t5.load import load_t5
from hilora_jax.t5.lora import SingleLoraHook, T5LoraAdapter, read_t5_adapter
from hilora_jax.t5.model import T5ForConditionalGeneration

__all__ = ["SingleLoraHook", "T5Config", "T5Engine", "T5ForConditionalGeneration", "T5LoraAdapter",
           "load_t5", "read_t5_adapter", "read_t5_config"]
