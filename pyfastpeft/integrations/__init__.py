"""Glue to other libraries' models and formats (HF transformers patching, quantization, PEFT adapters)."""
