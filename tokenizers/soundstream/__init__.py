"""SoundStream audio tokenizer: causal 1D conv codec with residual VQ."""
