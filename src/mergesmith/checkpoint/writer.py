"""Write a sharded safetensors checkpoint, streaming, and finish atomically.

Every output tensor's name, dtype and shape is known before any weight is read,
so the shard layout (which file, which byte range) is fixed up front: each shard
gets its header and its full size at once, and a tensor is written to its own
byte range as soon as it is computed, in any order. Only tensors in flight are
held in memory, never a shard.

All files go to a temporary directory beside the output (``.NAME.partial-PID``).
``commit()`` renames it into place; until then no directory at the output path
looks like a finished model, and ``abort()`` (or an exception inside the ``with``
block) removes the temporary directory.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch

from mergesmith.checkpoint.reader import DTYPE_NAMES

INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class OutputTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = torch.empty((), dtype=self.dtype).element_size()
        for d in self.shape:
            n *= d
        return n


@dataclass
class Shard:
    filename: str
    tensors: list[OutputTensor] = field(default_factory=list)
    offsets: dict[str, tuple[int, int]] = field(default_factory=dict)
    header: bytes = b""

    @property
    def size(self) -> int:
        return len(self.header) + sum(t.nbytes for t in self.tensors)


def plan_shards(tensors: Iterable[OutputTensor], max_shard_bytes: int) -> list[Shard]:
    """Group tensors into shards of at most ``max_shard_bytes`` (a larger tensor gets its own)."""
    groups: list[list[OutputTensor]] = [[]]
    size = 0
    for t in tensors:
        if groups[-1] and size + t.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    n = len(groups)
    shards = []
    for i, group in enumerate(groups):
        shard = Shard(f"model-{i + 1:05d}-of-{n:05d}.safetensors", group)
        entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
        pos = 0
        for t in group:
            shard.offsets[t.name] = (pos, pos + t.nbytes)
            entries[t.name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                               "data_offsets": [pos, pos + t.nbytes]}
            pos += t.nbytes
        raw = json.dumps(entries, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned
        shard.header = len(raw).to_bytes(8, "little") + raw
        shards.append(shard)
    return shards


class CheckpointWriter:
    def __init__(self, out_dir: Path, tensors: list[OutputTensor], max_shard_bytes: int,
                 overwrite: bool = False):
        self.out_dir = Path(out_dir)
        self.overwrite = overwrite
        self.tmp_dir = self.out_dir.parent / f".{self.out_dir.name}.partial-{os.getpid()}"
        self.shards = plan_shards(tensors, max_shard_bytes)
        self._where: dict[str, tuple[int, int, OutputTensor]] = {}
        self._fds: list[int] = []
        self._written: set[str] = set()

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for s in self.shards for t in s.tensors)

    def __enter__(self) -> "CheckpointWriter":
        if self.tmp_dir.exists():
            shutil.rmtree(self.tmp_dir)
        self.tmp_dir.mkdir(parents=True)
        for i, shard in enumerate(self.shards):
            fd = os.open(self.tmp_dir / shard.filename, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds.append(fd)
            os.pwrite(fd, shard.header, 0)
            os.ftruncate(fd, shard.size)
            for t in shard.tensors:
                begin, _ = shard.offsets[t.name]
                self._where[t.name] = (fd, len(shard.header) + begin, t)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write one tensor to its byte range. Thread-safe for distinct names."""
        fd, offset, spec = self._where[name]
        if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise RuntimeError(f"{name}: planned {spec.dtype} {list(spec.shape)}, "
                               f"got {tensor.dtype} {list(tensor.shape)}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        view = memoryview(data)
        while view:
            n = os.pwrite(fd, view, offset)
            view = view[n:]
            offset += n
        self._written.add(name)

    def write_file(self, relative: str, content: str | bytes) -> None:
        path = self.tmp_dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)

    def copy_file(self, source: Path, relative: str | None = None) -> None:
        shutil.copyfile(source, self.tmp_dir / (relative or source.name))

    def commit(self) -> Path:
        missing = [n for n in self._where if n not in self._written]
        if missing:
            raise RuntimeError(f"{len(missing)} planned tensors were never written (e.g. {missing[0]})")
        weight_map = {t.name: s.filename for s in self.shards for t in s.tensors}
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        self.write_file(INDEX_NAME, json.dumps(index, indent=2) + "\n")
        for fd in self._fds:
            os.fsync(fd)
            os.close(fd)
        self._fds.clear()
        old = None
        if self.out_dir.exists():
            if not self.overwrite:
                raise FileExistsError(f"{self.out_dir} exists; pass --overwrite to replace it")
            old = self.out_dir.parent / f".{self.out_dir.name}.old-{os.getpid()}"
            os.rename(self.out_dir, old)
        os.rename(self.tmp_dir, self.out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.out_dir

    def abort(self) -> None:
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
