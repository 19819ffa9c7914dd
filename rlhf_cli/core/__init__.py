"""Small shared builders: models and tokenizers, quantization, LoRA, datasets, device."""
