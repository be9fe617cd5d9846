"""T5 / FLAN-T5 encoder-decoder family: strict config reading, Flax NNX model with HF names,
strict HF loading (safetensors, sharded, pytorch_model.bin), jitted inference (encode once,
cached cross-attention K/V, greedy / sampled generation, choice scoring), PEFT T5 adapters.

Wired into the library: the projection rows are `hilora_jax.model.projections.T5` (the shared
`Projection` type); the model speaks the `LoraHook` protocol (`deltas(block, rows, x)`), so
`lora.load_pool` builds T5 pools from PEFT T5 adapters (`t5.lora.read_t5_pool_adapter`) in the
Llama layout and every router of `routing.build_router` runs on T5; `T5Engine` shares
`inference.SplitEngine`; `hilora eval` scores choices as decoder targets (`T5ChoiceScorer`);
`hilora aot --preset flan-t5-large` compiles `t5.generate.prefill` / `decode_step` (`t5.aot`).
"""

from hilora_jax.t5.config import T5Config, read_t5_config
from hilora_jax.t5.generate import T5Engine
from hilora_jax.t5.load import load_t5
from hilora_jax.t5.lora import SingleLoraHook, T5LoraAdapter, read_t5_adapter
from hilora_jax.t5.model import T5ForConditionalGeneration

__all__ = ["SingleLoraHook", "T5Config", "T5Engine", "T5ForConditionalGeneration", "T5LoraAdapter",
           "load_t5", "read_t5_adapter", "read_t5_config"]
