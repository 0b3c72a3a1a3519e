"""Lazy, read-only access to a Hugging Face safetensors checkpoint, tensor by tensor.

Only safetensors are read: pickled weights (``*.bin``, ``*.pt``, ``*.pth``, ``*.ckpt``) can
run code when loaded, so a directory holding only those is refused with a message saying
how to convert it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from evomerge.checkpoint.layout import count_layers
from evomerge.errors import EvomergeError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# safetensors dtype codes -> torch dtypes
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: str  # the shard holding it, relative to the checkpoint directory

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class CheckpointReader:
    """Names, shapes and dtypes of a checkpoint's tensors without loading them; each tensor
    loaded on demand from its memory-mapped shard.

    >>> ckpt = CheckpointReader("zoo/base")
    >>> ckpt.info("lm_head.weight").shape
    (100, 128)
    >>> w = ckpt.get("model.layers.0.mlp.up_proj.weight")
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise EvomergeError(f"{self.path}: not a checkpoint directory (it does not exist)")
        self._handles: dict[str, object] = {}
        self._weight_map = self._read_weight_map()
        self._infos: dict[str, TensorInfo] = {}
        for file in dict.fromkeys(self._weight_map.values()):
            handle = self._open(file)
            for name in handle.keys():  # noqa: SIM118 (a safe_open handle, not a dict)
                if self._weight_map.get(name) != file:
                    continue  # a tensor the index assigns to another shard
                sl = handle.get_slice(name)
                code = sl.get_dtype()
                if code not in _DTYPES:
                    raise EvomergeError(f"{self.path / file}: tensor {name!r} has unsupported dtype {code}")
                self._infos[name] = TensorInfo(name, tuple(sl.get_shape()), _DTYPES[code], file)
        missing = sorted(set(self._weight_map) - set(self._infos))
        if missing:
            raise EvomergeError(
                f"{self.path / INDEX_FILE}: tensor {missing[0]!r} is listed in the index but "
                f"missing from {self._weight_map[missing[0]]}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            )

    def _read_weight_map(self) -> dict[str, str]:
        index = self.path / INDEX_FILE
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise EvomergeError(f"{index}: not a valid safetensors index ({e})") from None
            for file in set(weight_map.values()):
                if not (self.path / file).is_file():
                    raise EvomergeError(f"{index}: shard {file!r} does not exist")
            return dict(weight_map)
        if (self.path / SINGLE_FILE).is_file():
            files = [SINGLE_FILE]
        else:
            # Shards without an index: every *.safetensors file in the directory.
            files = sorted(p.name for p in self.path.glob("*.safetensors"))
        if not files:
            pickles = sorted(p.name for p in self.path.iterdir() if p.suffix in PICKLE_SUFFIXES)
            if pickles:
                raise EvomergeError(
                    f"{self.path}: only pickled weights found ({', '.join(pickles)}); evomerge loads "
                    "safetensors only, because unpickling can run arbitrary code. Convert with "
                    "`model.save_pretrained(dir)` in a trusted environment."
                )
            raise EvomergeError(f"{self.path}: no *.safetensors weights found")
        weight_map: dict[str, str] = {}
        for file in files:
            for name in self._open(file).keys():  # noqa: SIM118
                if name in weight_map:
                    raise EvomergeError(
                        f"{self.path}: tensor {name!r} is in both {weight_map[name]} and {file}"
                    )
                weight_map[name] = file
        return weight_map

    def _open(self, file: str):
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(self.path / file), framework="pt", device="cpu")
            except (SafetensorError, OSError) as e:
                raise EvomergeError(f"{self.path / file}: cannot read safetensors file ({e})") from None
        return self._handles[file]

    # -- what is in it -------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        """Tensor names, in the order the checkpoint stores them."""
        return list(self._infos)

    def __contains__(self, name: str) -> bool:
        return name in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise EvomergeError(f"{self.path}: no tensor named {name!r}") from None

    @cached_property
    def config(self) -> dict:
        """``config.json`` as a dict ({} if the checkpoint has none)."""
        path = self.path / "config.json"
        if not path.exists():
            return {}
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise EvomergeError(f"{path}: invalid JSON ({e})") from None

    @cached_property
    def num_layers(self) -> int:
        return count_layers(self._infos)

    # -- loading -------------------------------------------------------------------------

    def get(self, name: str) -> torch.Tensor:
        """Load one tensor (a fresh CPU tensor, read from the memory-mapped shard)."""
        info = self.info(name)
        return self._open(info.file).get_tensor(name)
