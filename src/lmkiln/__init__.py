"""lmkiln: raw text to a trained, fine-tuned, evaluated and served language model."""

__version__ = "0.1.0"
