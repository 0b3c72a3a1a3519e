"""Reading and writing Hugging Face safetensors checkpoints, and where each tensor sits."""

from evomerge.checkpoint.layout import Block, TensorLocation, count_layers, locate, with_layer
from evomerge.checkpoint.reader import CheckpointReader, TensorInfo, TensorSource
from evomerge.checkpoint.writer import CheckpointWriter

__all__ = [
    "Block",
    "CheckpointReader",
    "CheckpointWriter",
    "TensorInfo",
    "TensorLocation",
    "TensorSource",
    "count_layers",
    "locate",
    "with_layer",
]
