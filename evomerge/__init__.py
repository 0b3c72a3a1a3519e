"""evomerge: search for the best way to merge fine-tuned language models."""

__version__ = "0.1.0"
