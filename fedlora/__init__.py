"""fedlora: federated LoRA fine-tuning of language models across institutions."""

__version__ = "0.1.0"
