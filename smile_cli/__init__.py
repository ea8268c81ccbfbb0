"""smile: zero-shot Sparse Mixture of Low-rank Experts (SMILE) from a base model and its fine-tunes."""

__version__ = "0.1.0"
