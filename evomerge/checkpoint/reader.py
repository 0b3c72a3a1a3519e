"""Lazy, read-only access to a Hugging Face safetensors checkpoint, tensor by tensor.

Headers are parsed on open (names, shapes, dtypes, byte offsets); a tensor's bytes are
mapped, privately and copy-on-write, when it is asked for, and unmapped when the tensor is
freed. The merge reads the page cache directly (no copy into a buffer of our own), and
nothing stays resident in the process after the tensor is dropped, so a merge's memory is
the tensors in flight, not the sum of the inputs it has touched.

Only safetensors are read: pickled weights (``*.bin``, ``*.pt``, ``*.pth``, ``*.ckpt``) can
run code when loaded, so a directory holding only those is refused with a message saying
how to convert it.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import struct
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

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


@dataclass(frozen=True)
class _Shard:
    fd: int
    data_start: int
    entries: dict[str, tuple[str, tuple[int, ...], int, int]]  # name -> (code, shape, begin, end)


def _read_header(path: Path) -> _Shard:
    """Parse a safetensors file's header; errors name the file."""

    def bad(why: str) -> EvomergeError:
        return EvomergeError(f"{path}: cannot read safetensors file ({why})")

    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise bad(e.strerror) from None
    try:
        size = os.fstat(fd).st_size
        head = os.pread(fd, 8, 0)
        if len(head) < 8:
            raise bad("too short")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100 * 1024**2):
            raise bad("header size out of range")
        header = json.loads(os.pread(fd, n, 8))
        if not isinstance(header, dict):
            raise bad("header is not a JSON object")
        entries = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            begin, end = entry["data_offsets"]
            if not 0 <= begin <= end <= size - 8 - n:
                raise bad(f"tensor {name!r} lies outside the file")
            entries[name] = (entry["dtype"], tuple(entry["shape"]), begin, end)
        return _Shard(fd, 8 + n, entries)
    except EvomergeError:
        os.close(fd)
        raise
    except (ValueError, KeyError, TypeError) as e:
        os.close(fd)
        raise bad(f"malformed header: {e}") from None


class TensorSource:
    """What the merge engine reads tensors from: names, shapes and dtypes up front (``_infos``,
    in stored order), each tensor on demand (``get``). A checkpoint on disk, one shared in
    memory (:mod:`evomerge.checkpoint.memory`) and a stage of a staged recipe
    (:class:`evomerge.merge.StageReader`) are all one."""

    path: Path
    _infos: dict[str, TensorInfo]

    @property
    def names(self) -> list[str]:
        """Tensor names, in the order the source stores them."""
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
    def num_layers(self) -> int:
        return count_layers(self._infos)

    def get(self, name: str) -> torch.Tensor:
        raise NotImplementedError


class CheckpointReader(TensorSource):
    """Names, shapes and dtypes of a checkpoint's tensors without loading them; each tensor
    loaded on demand from its shard.

    >>> ckpt = CheckpointReader("zoo/base")
    >>> ckpt.info("lm_head.weight").shape
    (100, 128)
    >>> w = ckpt.get("model.layers.0.mlp.up_proj.weight")
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise EvomergeError(f"{self.path}: not a checkpoint directory (it does not exist)")
        self._shards: dict[str, _Shard] = {}
        self._weight_map = self._read_weight_map()
        self._infos: dict[str, TensorInfo] = {}
        for file in dict.fromkeys(self._weight_map.values()):
            for name, (code, shape, _, _) in self._open(file).entries.items():
                if self._weight_map.get(name) != file:
                    continue  # a tensor the index assigns to another shard
                if code not in _DTYPES:
                    raise EvomergeError(f"{self.path / file}: tensor {name!r} has unsupported dtype {code}")
                self._infos[name] = TensorInfo(name, shape, _DTYPES[code], file)
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
            for name in self._open(file).entries:
                if name in weight_map:
                    raise EvomergeError(
                        f"{self.path}: tensor {name!r} is in both {weight_map[name]} and {file}"
                    )
                weight_map[name] = file
        return weight_map

    def _open(self, file: str) -> _Shard:
        if file not in self._shards:
            self._shards[file] = _read_header(self.path / file)
        return self._shards[file]

    def close(self) -> None:
        for shard in self._shards.values():
            os.close(shard.fd)
        self._shards.clear()

    def __del__(self):
        with contextlib.suppress(Exception):  # at interpreter shutdown os may be gone
            self.close()

    # -- what is in it -------------------------------------------------------------------

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

    # -- loading -------------------------------------------------------------------------

    def get(self, name: str) -> torch.Tensor:
        """One tensor, on CPU: a private (copy-on-write) map of its bytes in the shard, released
        when the tensor is freed. Writing to it never changes the file."""
        info = self.info(name)
        shard = self._open(info.file)
        _, _, begin, end = shard.entries[name]
        if end == begin:
            return torch.empty(info.shape, dtype=info.dtype)
        start = shard.data_start + begin
        if os.fstat(shard.fd).st_size < start + (end - begin):  # shrunk since it was opened
            raise EvomergeError(f"{self.path / info.file}: tensor {name!r} is truncated")
        page = start - start % mmap.ALLOCATIONGRANULARITY
        mapped = mmap.mmap(
            shard.fd,
            start + (end - begin) - page,
            flags=mmap.MAP_PRIVATE,
            prot=mmap.PROT_READ | mmap.PROT_WRITE,
            offset=page,
        )
        data = torch.frombuffer(mapped, dtype=torch.uint8, offset=start - page, count=end - begin)
        if start % info.dtype.itemsize:  # misaligned for its dtype (odd-sized neighbours): copy
            data = data.clone()
        return data.view(info.dtype).reshape(info.shape)
