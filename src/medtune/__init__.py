"""medtune: fine-tune open LLMs on medical instruction data with LoRA/QLoRA."""

__version__ = "0.1.0"
