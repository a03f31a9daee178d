"""TenSafe's ``torch`` ML backend: Hugging Face causal LMs with PEFT LoRA and Opacus DP-SGD."""

__version__ = "0.2.0"
