"""Write a sharded safetensors checkpoint, streaming, and finish atomically.

Every output tensor's name, dtype and shape is known before any weight is read,
so the shard layout (which file, which byte range) is fixed up front: each shard
gets its header and its full size at once, and a tensor is written to its own
byte range as soon as it is computed, in any order. Only tensors in flight are
held in memory, never a shard.

All files go to a temporary directory beside the output (``.NAME.partial-PID``).
``commit()`` renames it into place; until then no directory at the output path
looks like a finished model, and ``abort()`` (or an exception inside the ``with``
block) removes the temporary directory. A temporary directory left by a process
that was killed outright (SIGKILL, power loss) is removed by the next run on the
same output, once its process is gone.

Each shard's full size is reserved on disk up front (``fallocate``), so a disk too
small for the model fails at the start, not after an hour of merging. Any write
error (full disk, read-only file system, permission) becomes a ``ResourceError``
naming the output, after the temporary directory is removed.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from mergesmith.checkpoint.reader import DTYPE_NAMES
from mergesmith.errors import ResourceError
from mergesmith.paths import process_alive

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
        shard.header, shard.offsets = safetensors_header(group)
        shards.append(shard)
    return shards


def safetensors_header(tensors: list[OutputTensor]) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """The header of a safetensors file holding ``tensors`` in this order, and each one's byte range
    (relative to the end of the header)."""
    entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offsets: dict[str, tuple[int, int]] = {}
    pos = 0
    for t in tensors:
        offsets[t.name] = (pos, pos + t.nbytes)
        entries[t.name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [pos, pos + t.nbytes]}
        pos += t.nbytes
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned
    return len(raw).to_bytes(8, "little") + raw, offsets


def write_safetensors(path: Path, tensors: list[OutputTensor], produce: Callable[[str], torch.Tensor]) -> None:
    """Write one safetensors file tensor by tensor: ``produce(name)`` gives each tensor in turn, and
    it is written and let go before the next is asked for, so at most one tensor's bytes are held
    (``safetensors.torch.save_file`` holds a byte copy of every tensor at once)."""
    header, _ = safetensors_header(tensors)
    with open(path, "wb") as f:
        f.write(header)
        for spec in tensors:
            tensor = produce(spec.name)
            if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
                raise _not_planned(spec, tensor)
            f.write(memoryview(_raw_bytes(tensor)))
            del tensor


def _not_planned(spec: OutputTensor, tensor: torch.Tensor, where: str = "") -> RuntimeError:
    return RuntimeError(f"{spec.name}: planned {spec.dtype} {list(spec.shape)}, got {tensor.dtype} "
                        f"{list(tensor.shape)}{where}")


def _raw_bytes(tensor: torch.Tensor) -> Any:
    """The tensor's bytes as stored in a safetensors file (C order), as a numpy uint8 view on CPU."""
    return tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()


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
        self._rows: dict[str, int] = {}  # rows written so far of tensors written in row blocks

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for s in self.shards for t in s.tensors)

    def __enter__(self) -> "CheckpointWriter":
        try:
            remove_stale_partials(self.out_dir)
            if self.tmp_dir.exists():
                shutil.rmtree(self.tmp_dir)
            self.tmp_dir.mkdir(parents=True)
            for shard in self.shards:
                fd = os.open(self.tmp_dir / shard.filename, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
                self._fds.append(fd)
                _reserve(fd, shard.size)
                _pwrite_all(fd, shard.header, 0)
                for t in shard.tensors:
                    begin, _ = shard.offsets[t.name]
                    self._where[t.name] = (fd, len(shard.header) + begin, t)
        except OSError as err:
            self.abort()
            raise self._fault(err, "cannot create the output") from err
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    def _fault(self, err: OSError, doing: str) -> ResourceError:
        what = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
                errno.EPERM: "permission denied"}.get(err.errno, err.strerror or str(err))
        return ResourceError(f"{self.out_dir}: {doing}: {what}"
                             + (f" ({err.filename})" if getattr(err, "filename", None) else "")
                             + "; nothing was written there (inputs untouched); free space, fix the "
                               "permissions or choose another output path")

    def write(self, name: str, tensor: torch.Tensor, row: int = 0) -> None:
        """Write one tensor to its byte range, or, from ``row`` on, a block of its rows (along the
        first axis): a tensor merged in row blocks is never whole in memory. The tensor counts as
        written once all its rows are. Thread-safe for distinct names."""
        fd, offset, spec = self._where[name]
        whole = row == 0 and tuple(tensor.shape) == spec.shape
        rows_fit = (tensor.dim() == len(spec.shape) >= 1 and tuple(tensor.shape[1:]) == spec.shape[1:]
                    and 0 <= row and row + tensor.shape[0] <= spec.shape[0])
        if tensor.dtype != spec.dtype or not (whole or rows_fit):
            raise _not_planned(spec, tensor, f" at row {row}")
        data = _raw_bytes(tensor)
        if row:
            offset += row * (spec.nbytes // spec.shape[0])
        try:
            _pwrite_all(fd, memoryview(data), offset)
        except OSError as err:
            raise self._fault(err, f"writing {name} failed") from err
        if whole:
            self._written.add(name)
            return
        self._rows[name] = self._rows.get(name, 0) + tensor.shape[0]
        if self._rows[name] >= spec.shape[0]:
            self._written.add(name)

    def write_file(self, relative: str, content: str | bytes) -> None:
        path = self.tmp_dir / relative
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content.encode() if isinstance(content, str) else content)
        except OSError as err:
            raise self._fault(err, f"writing {relative} failed") from err

    def copy_file(self, source: Path, relative: str | None = None) -> None:
        try:
            shutil.copyfile(source, self.tmp_dir / (relative or source.name))
        except OSError as err:
            raise self._fault(err, f"copying {source.name} failed") from err

    def commit(self) -> Path:
        missing = [n for n in self._where if n not in self._written]
        if missing:
            raise RuntimeError(f"{len(missing)} planned tensors were never written (e.g. {missing[0]})")
        weight_map = {t.name: s.filename for s in self.shards for t in s.tensors}
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        self.write_file(INDEX_NAME, json.dumps(index, indent=2) + "\n")
        try:
            for fd in self._fds:
                os.fsync(fd)
                os.close(fd)
            self._fds.clear()
        except OSError as err:
            raise self._fault(err, "flushing the shards failed") from err
        old = None
        if self.out_dir.exists():
            if not self.overwrite:
                raise FileExistsError(f"{self.out_dir} exists; pass --overwrite to replace it")
            old = self.out_dir.parent / f".{self.out_dir.name}.old-{os.getpid()}"
            os.rename(self.out_dir, old)
        try:
            os.rename(self.tmp_dir, self.out_dir)
        except OSError:
            if old is not None:  # put the previous model back: a failed overwrite loses nothing
                os.rename(old, self.out_dir)
            raise
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


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def _fallocate():
    try:
        fn = ctypes.CDLL(None, use_errno=True).fallocate
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    fn.restype = ctypes.c_int
    return fn


_FALLOCATE = _fallocate() if os.name == "posix" else None


def _reserve(fd: int, size: int) -> None:
    """Give the file its full size, with its blocks allocated where the file system can.

    ``fallocate(2)`` reserves the space, so ENOSPC comes now; where the file system
    cannot (EOPNOTSUPP), the file is extended sparsely and a full disk is found while
    writing instead. (glibc's ``posix_fallocate`` would instead write zeros over the
    whole file on such file systems, which costs as much as the merge's own writes.)
    """
    if size > 0 and _FALLOCATE is not None:
        if _FALLOCATE(fd, 0, 0, size) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise OSError(err, os.strerror(err))
    os.ftruncate(fd, size)


_PARTIAL_RE = re.compile(r"^\.(?P<name>.+)\.(?:partial|old)-(?P<pid>\d+)$")


def clean_after(out_dir: Path, pid: int) -> None:
    """Undo what a writer in process ``pid``, stopped or dead, left beside ``out_dir``.

    Its ``.NAME.partial-PID`` folder is removed. When it was replacing a model it had moved
    the old one to ``.NAME.old-PID`` first; stopped between its two renames, it left the old
    model there and nothing at ``out_dir``, so the old model is put back (nothing is lost).
    """
    out_dir = Path(out_dir)
    shutil.rmtree(out_dir.parent / f".{out_dir.name}.partial-{pid}", ignore_errors=True)
    old = out_dir.parent / f".{out_dir.name}.old-{pid}"
    if old.exists():
        if out_dir.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(old, out_dir)


def remove_stale_partials(out_dir: Path) -> list[int]:
    """``clean_after`` every writer of ``out_dir`` whose process is gone; returns their PIDs."""
    out_dir = Path(out_dir)
    if not out_dir.parent.is_dir():
        return []
    dead = set()
    for entry in out_dir.parent.iterdir():
        m = _PARTIAL_RE.match(entry.name)
        if m and m["name"] == out_dir.name and entry.is_dir() and not process_alive(int(m["pid"])):
            dead.add(int(m["pid"]))
    for pid in sorted(dead):
        clean_after(out_dir, pid)
    return sorted(dead)

