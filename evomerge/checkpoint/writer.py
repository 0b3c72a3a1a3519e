"""Writing Hugging Face safetensors checkpoints, sharded and atomically.

Tensors are streamed in with :meth:`CheckpointWriter.add`. Given the ``layout`` up front
(names, shapes and dtypes in the order they will be added, which a merge plan knows), each
tensor's bytes go straight to its shard file (with O_DIRECT where the filesystem allows it,
see :class:`_SequentialFile`; ``direct_io=False`` writes through the page cache) and memory
holds nothing but the tensor being written. Without a layout, a shard is buffered and flushed when it reaches
``max_shard_bytes``, so memory holds at most one shard. Everything goes
to a hidden temporary directory beside the target, which is renamed into place only when
complete: an interrupted write never leaves a directory that looks like a checkpoint.

>>> with CheckpointWriter("out/model", metadata_from="zoo/base") as w:
...     for name in names:
...         w.add(name, merged(name))
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import shutil
import struct
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from evomerge.checkpoint.reader import _DTYPES, INDEX_FILE, SINGLE_FILE
from evomerge.errors import EvomergeError

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
_CODES = {dtype: code for code, dtype in _DTYPES.items()}
Layout = list[tuple[str, tuple[int, ...], torch.dtype]]


def _nbytes(shape, dtype: torch.dtype) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * torch.empty((), dtype=dtype).element_size()


class _SequentialFile:
    """A file written front to back. Where the filesystem allows it, whole 4 KiB-aligned blocks
    go to disk with O_DIRECT from one reused staging buffer, and only the last partial block
    through the page cache: the output of a merge does not have to fill the page cache (whose
    fresh pages are the slowest memory a process can touch on some machines, e.g. VMs that hand
    freed memory back to their host) and leaves no writeback behind. Elsewhere, plain writes."""

    ALIGN = 4096
    STAGE = 32 * 1024 * 1024

    def __init__(self, path: Path, direct_io: bool = True):
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.direct: int | None = None
        if direct_io and hasattr(os, "O_DIRECT"):
            with contextlib.suppress(OSError):  # e.g. tmpfs: no O_DIRECT
                self.direct = os.open(path, os.O_WRONLY | os.O_DIRECT)
        self.stage = mmap.mmap(-1, self.STAGE) if self.direct is not None else None
        self.fill = 0  # bytes staged
        self.offset = 0  # bytes written before the stage

    def write(self, data) -> None:
        data = memoryview(data).cast("B")
        while len(data):
            if self.stage is None:  # no direct I/O here (or no longer)
                self._write_plain(data)
                return
            n = min(len(data), self.STAGE - self.fill)
            self.stage[self.fill : self.fill + n] = data[:n]
            self.fill += n
            data = data[n:]
            if self.fill == self.STAGE:
                self._flush(self.STAGE)

    def _write_plain(self, data: memoryview) -> None:
        while len(data):
            n = os.pwrite(self.fd, data, self.offset)
            self.offset += n
            data = data[n:]

    def _flush(self, size: int) -> None:
        """Write the first ``size`` staged bytes (a multiple of ALIGN) and keep the rest staged."""
        view = memoryview(self.stage)[:size]
        try:
            while len(view):
                n = os.pwrite(self.direct, view, self.offset)
                if n % self.ALIGN:
                    raise OSError(f"short direct write of {n} bytes")
                self.offset += n
                view = view[n:]
        except OSError:  # the filesystem refused direct I/O after all: plain writes from here on
            self._write_plain(view)
            os.close(self.direct)
            self.direct = None
        del view  # (an mmap cannot close while a view of it exists)
        rest = self.stage[size : self.fill]  # under one block: a copy
        self.stage[: len(rest)] = rest
        self.fill = len(rest)
        if self.direct is None:
            self.stage.close()
            self.stage, self.fill = None, 0
            self._write_plain(memoryview(rest))

    def close(self, discard: bool = False) -> None:
        """Write what is staged (unless ``discard``: the file is being thrown away) and close."""
        if self.stage is not None and not discard:
            self._flush(self.fill - self.fill % self.ALIGN)  # (may fall back: then no stage is left)
        if self.stage is not None:
            if self.fill and not discard:  # the last partial block: through the page cache
                self._write_plain(memoryview(self.stage)[: self.fill])
            self.stage.close()
            self.stage = None
        if self.direct is not None:
            os.close(self.direct)
            self.direct = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _StreamedShard:
    """One safetensors file whose header is written first, then each tensor's bytes in order."""

    def __init__(self, path: Path, entries: Layout, direct_io: bool):
        self.path, self.entries = path, entries
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, dtype in entries:
            size = _nbytes(shape, dtype)
            header[name] = {
                "dtype": _CODES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + size],
            }
            offset += size
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-(8 + len(blob)) % 8)  # data starts 8-byte aligned
        self.file = _SequentialFile(path, direct_io)
        self.file.write(struct.pack("<Q", len(blob)) + blob)
        self.next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want_name, shape, dtype = self.entries[self.next]
        if name != want_name or tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise RuntimeError(
                f"tensor {name} {list(tensor.shape)} {tensor.dtype} does not match the declared layout "
                f"({want_name} {list(shape)} {dtype})"
            )
        self.file.write(tensor.reshape(-1).view(torch.uint8).numpy())
        self.next += 1

    @property
    def done(self) -> bool:
        return self.next == len(self.entries)

    def close(self, discard: bool = False) -> None:
        self.file.close(discard)


# Files copied when present: the model's config from `metadata_from`, the tokenizer's
# files from `tokenizer_from` (default: the same directory).
CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


class CheckpointWriter:
    """Stream tensors into a new checkpoint directory; see the module docstring."""

    def __init__(
        self,
        out: str | Path,
        *,
        metadata_from: str | Path | None = None,
        tokenizer_from: str | Path | None = None,
        config_updates: dict | None = None,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
        overwrite: bool = False,
        layout: Layout | None = None,
        direct_io: bool = True,
    ):
        self.out = Path(out)
        if self.out.exists() and not overwrite:
            raise EvomergeError(f"{self.out}: already exists (pass overwrite to replace it)")
        if max_shard_bytes <= 0:
            raise EvomergeError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        self.metadata_from = Path(metadata_from) if metadata_from else None
        if self.metadata_from and not self.metadata_from.is_dir():
            raise EvomergeError(f"{self.metadata_from}: metadata source is not a directory")
        self.tokenizer_from = Path(tokenizer_from) if tokenizer_from else self.metadata_from
        self.config_updates = config_updates or {}
        self.max_shard_bytes = max_shard_bytes
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.partial.", dir=self.out.parent))
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []  # names in each flushed shard
        self._seen: set[str] = set()
        self._total_bytes = 0
        self._closed = False
        self._layout = layout
        self._direct_io = direct_io
        self._streams: list[_StreamedShard] = []
        if layout is not None:
            self._plan_streams(layout)

    def _plan_streams(self, layout: Layout) -> None:
        if not layout:
            raise EvomergeError(f"{self.out}: the layout declares no tensors")
        groups: list[Layout] = [[]]
        size = 0
        for entry in layout:
            nbytes = _nbytes(entry[1], entry[2])
            if groups[-1] and size + nbytes > self.max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(entry)
            size += nbytes
        self._shards = [[name for name, _, _ in g] for g in groups]
        n = len(groups)
        self._files = (
            [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self._groups = groups
        self._total_bytes = sum(_nbytes(shape, dtype) for _, shape, dtype in layout)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self._closed:
            raise RuntimeError("CheckpointWriter is closed")
        if name in self._seen:
            raise EvomergeError(f"tensor {name!r} written twice")
        self._seen.add(name)
        tensor = tensor.detach().to("cpu").contiguous()
        if self._layout is not None:
            if not self._streams or self._streams[-1].done:
                i = len(self._streams)
                if i == len(self._groups):
                    raise RuntimeError(f"tensor {name} is beyond the declared layout")
                if self._streams:
                    self._streams[-1].close()
                self._streams.append(
                    _StreamedShard(self._tmp / self._files[i], self._groups[i], self._direct_io)
                )
            self._streams[-1].write(name, tensor)
            return
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor
        self._pending_bytes += size
        self._total_bytes += size

    def _flush(self) -> None:
        if not self._pending:
            return
        save_file(
            self._pending, str(self._tmp / f"shard-{len(self._shards):05d}.tmp"), metadata={"format": "pt"}
        )
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def commit(self) -> Path:
        """Finish the checkpoint and move it into place; returns its path."""
        if self._layout is not None:
            self._finish_streams()
        else:
            self._finish_buffered()
        self._copy_metadata()
        if self.out.exists():  # overwrite: move the old one aside first, then swap
            old = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.old.", dir=self.out.parent))
            self.out.rename(old / "x")
            self._tmp.rename(self.out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            self._tmp.rename(self.out)
        self._closed = True
        return self.out

    def _finish_streams(self) -> None:
        missing = len(self._layout) - len(self._seen)
        if missing:
            raise RuntimeError(f"{self.out}: {missing} declared tensors were never written")
        self._streams[-1].close()
        if len(self._files) > 1:
            self._write_index(
                {name: self._files[i] for i, names in enumerate(self._shards) for name in names}
            )

    def _write_index(self, weight_map: dict[str, str]) -> None:
        index = {"metadata": {"total_size": self._total_bytes}, "weight_map": weight_map}
        (self._tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")

    def _finish_buffered(self) -> None:
        self._flush()
        n = len(self._shards)
        if n == 0:
            raise EvomergeError(f"{self.out}: no tensors were written")
        if n == 1:
            (self._tmp / "shard-00000.tmp").rename(self._tmp / SINGLE_FILE)
        else:
            weight_map = {}
            for i, names in enumerate(self._shards):
                file = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                (self._tmp / f"shard-{i:05d}.tmp").rename(self._tmp / file)
                weight_map.update(dict.fromkeys(names, file))
            self._write_index(weight_map)

    def _copy_metadata(self) -> None:
        for source, names in [(self.metadata_from, CONFIG_FILES), (self.tokenizer_from, TOKENIZER_FILES)]:
            for name in names if source else ():
                if (source / name).is_file():
                    shutil.copy2(source / name, self._tmp / name)
        if self.config_updates:
            path = self._tmp / "config.json"
            config = json.loads(path.read_text()) if path.exists() else {}
            config.update(self.config_updates)
            path.write_text(json.dumps(config, indent=2) + "\n")

    def abort(self) -> None:
        """Discard everything written so far; the target directory is left untouched."""
        self._closed = True
        self._pending.clear()
        for stream in self._streams:
            stream.close(discard=True)  # nothing more is written: a full disk cannot stop the clean-up
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
            return
        try:
            self.commit()
        except BaseException:
            self.abort()
            raise
