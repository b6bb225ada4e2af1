"""tunelab: fine-tune small language models for real tasks, on CPU or GPU."""

__version__ = "0.1.0"
