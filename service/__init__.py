"""basehold: load and hold Hugging Face base models, lend them to PEFT training workers."""

__version__ = "0.1.0"
