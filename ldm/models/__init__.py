"""Models: presets (plain functions building the VAE, text encoders and denoisers), the denoiser interface,
the CLIP tokenizer built offline, and LoRA adapters."""
