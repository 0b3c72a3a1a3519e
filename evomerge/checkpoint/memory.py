"""A checkpoint held in memory as flat byte arrays: what the search's workers share.

:func:`pack` reads every tensor of a checkpoint once into a plain dict of NumPy byte arrays
(any dtype, bfloat16 and float8 included, travels as raw bytes). Put in Ray's object store,
that dict is mapped read-only into every worker on the machine without a copy, and
:class:`MemoryCheckpoint` serves it with the reader interface the merge engine uses
(``names``, ``info``, ``get``, ``config``, ``num_layers``). ``get`` returns a view of the
shared bytes, not a copy: the merge methods never write to their inputs (a test checks it).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from evomerge.checkpoint.reader import CheckpointReader, TensorInfo, TensorSource


def pack(reader: CheckpointReader) -> dict:
    """Every tensor of ``reader`` as ``{"config", "path", "tensors": {name: (dtype, shape, bytes)}}``."""
    tensors = {}
    for name in reader.names:
        t = reader.get(name)
        raw = t.reshape(-1).view(torch.uint8).numpy()
        tensors[name] = (str(t.dtype).removeprefix("torch."), tuple(t.shape), raw)
    return {"config": reader.config, "path": str(reader.path), "tensors": tensors}


class MemoryCheckpoint(TensorSource):
    """Read-only checkpoint over :func:`pack`'s dict (e.g. from ``ray.get``)."""

    def __init__(self, packed: dict):
        self.path = Path(packed["path"])
        self.config = packed["config"]
        self._tensors = packed["tensors"]
        self._infos = {
            name: TensorInfo(name, tuple(shape), getattr(torch, dtype), "")
            for name, (dtype, shape, _) in self._tensors.items()
        }

    def get(self, name: str) -> torch.Tensor:
        """A tensor viewing the shared bytes (read-only by contract)."""
        info = self.info(name)
        raw = self._tensors[name][2]
        with warnings.catch_warnings():  # the object store hands out non-writable arrays
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.from_numpy(np.asarray(raw))
        return flat.view(info.dtype).reshape(info.shape)
