"""T5 / FLAN-T5 encoder-decoder family: strict config reading, Flax NNX model with HF names,
strict HF loading (safetensors, sharded, pytorch_model.bin), jitted inference (encode once,
cached cross-attention K/V, greedy / sampled generation, choice scoring), PEFT T5 adapters.

Wired into the library: the projection rows are `hilora_jax.model.projections.T5` (the shared
`Projection` type); the model speaks the `LoraHook` protocol (`deltas(block, rows, x)`), so
`lora.load_pool` builds T5 pools from PEFT T5 adapters (`t5.lora.read_t5_pool_adapter`) in the
Llama layout and every router of `routing.build_router` runs on T5; `T5Engine` shares
`inference.SplitEngine`; `hilora eval` scores choices as decoder targets (`T5ChoiceScorer`);
`hilora aot --preset flan-t5-large` compiles `t5.generate.prefill` / `decode_step` (`t5.aot`, also
with a saved pool dir); `lora.train.train_lora` / `hilora train-lora` train T5 LoRAs (the
seq2seq objective is `t5.train`), saved as PEFT `SEQ_2_SEQ_LM` adapters.
"""

from importlib import import_module

# Lazy (PEP 562): a Llama pool's loader asks `t5.config.T5Config` whether the base is a T5; that
# import must not load the T5 model, engine and loaders.
_EXPORTS = {"T5Config": "config", "read_t5_config": "config", "T5Engine": "generate",
            "load_t5": "load", "SingleLoraHook": "lora", "T5LoraAdapter": "lora",
            "read_t5_adapter": "lora", "T5ForConditionalGeneration": "model"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hilora_jax.t5' has no attribute {name!r}")
    return getattr(import_module(f"hilora_jax.t5.{_EXPORTS[name]}"), name)


def __dir__():
    return __all__
