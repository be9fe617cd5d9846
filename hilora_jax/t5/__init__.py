"""T5 / FLAN-T5 encoder-decoder family (config, Flax NNX model, strict loading, generation)."""
