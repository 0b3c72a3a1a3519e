"""Writing Hugging Face safetensors checkpoints, sharded and atomically.

Tensors are streamed in with :meth:`CheckpointWriter.add`; a shard is flushed to disk as
soon as it reaches ``max_shard_bytes``, so memory holds at most one shard. Everything goes
to a hidden temporary directory beside the target, which is renamed into place only when
complete: an interrupted write never leaves a directory that looks like a checkpoint.

>>> with CheckpointWriter("out/model", metadata_from="zoo/base") as w:
...     for name in names:
...         w.add(name, merged(name))
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from evomerge.checkpoint.reader import INDEX_FILE, SINGLE_FILE
from evomerge.errors import EvomergeError

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3

# Files copied from the metadata source when present: model config and tokenizer.
METADATA_FILES = (
    "config.json",
    "generation_config.json",
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
        config_updates: dict | None = None,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
        overwrite: bool = False,
    ):
        self.out = Path(out)
        if self.out.exists() and not overwrite:
            raise EvomergeError(f"{self.out}: already exists (pass overwrite to replace it)")
        if max_shard_bytes <= 0:
            raise EvomergeError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        self.metadata_from = Path(metadata_from) if metadata_from else None
        if self.metadata_from and not self.metadata_from.is_dir():
            raise EvomergeError(f"{self.metadata_from}: metadata source is not a directory")
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

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self._closed:
            raise RuntimeError("CheckpointWriter is closed")
        if name in self._seen:
            raise EvomergeError(f"tensor {name!r} written twice")
        self._seen.add(name)
        tensor = tensor.detach().to("cpu").contiguous()
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
            index = {"metadata": {"total_size": self._total_bytes}, "weight_map": weight_map}
            (self._tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
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

    def _copy_metadata(self) -> None:
        if self.metadata_from:
            for name in METADATA_FILES:
                src = self.metadata_from / name
                if src.is_file():
                    shutil.copy2(src, self._tmp / name)
        if self.config_updates:
            path = self._tmp / "config.json"
            config = json.loads(path.read_text()) if path.exists() else {}
            config.update(self.config_updates)
            path.write_text(json.dumps(config, indent=2) + "\n")

    def abort(self) -> None:
        """Discard everything written so far; the target directory is left untouched."""
        self._closed = True
        self._pending.clear()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()
