"""Lazy, per-tensor reading of Hugging Face checkpoints.

Opening a checkpoint reads only headers: the safetensors JSON header of each
shard (validated: a truncated or corrupt file is reported before any weight is
read) or, for PyTorch ``.bin`` files, the pickle's tensor metadata through a
memory-mapped ``torch.load``. ``read(name)`` then returns one tensor.

safetensors tensors are zero-copy views of a memory-mapped file, and so are
``.bin`` tensors (``torch.load(mmap=True)`` maps the whole file). Mapped pages
count towards the process's resident memory while they stay mapped, so after
converting a tensor the engine calls ``release(name)``, which tells the kernel
to drop those pages from this process (the data stays in the page cache and is
faulted back in if the view is touched again, so the view stays valid). For
``.bin`` files this is done only where ``/proc/self/maps`` shows the tensor's
bytes inside a mapping of that very file: dropping pages of ordinary memory
would zero them.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from mergesmith.errors import InputError

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS_DTYPES.items()}
MAX_HEADER_BYTES = 100 * 1024 * 1024
PAGE = mmap.PAGESIZE


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    # Absolute byte range in the file (safetensors only).
    start: int = 0
    end: int = 0

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate one safetensors file's header. Raises InputError."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise InputError(f"{path}: not a safetensors file (only {size} bytes); re-download or re-save it")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise InputError(f"{path}: corrupt or truncated safetensors header (header claims {n} bytes, "
                             f"file has {size}); re-download or re-save it")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: corrupt safetensors header ({err}); re-download or re-save it") from None
    if not isinstance(header, dict):
        raise InputError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_start = 8 + n
    infos: dict[str, TensorInfo] = {}
    problems = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            problems.append(f"{path}: tensor {name!r} has a malformed or unsupported header entry {entry!r}")
            continue
        info = TensorInfo(name, path, dtype, shape, data_start + begin, data_start + end)
        if end < begin or info.end > size:
            problems.append(f"{path}: tensor {name!r} lies past the end of the file (truncated download?); "
                            "re-download or re-save it")
        elif end - begin != info.nbytes:
            problems.append(f"{path}: tensor {name!r} has {end - begin} bytes for shape {list(shape)} "
                            f"of {entry['dtype']}; the file is corrupt")
        infos[name] = info
    if problems:
        raise InputError(problems)
    return infos


class Checkpoint:
    """One model folder's tensors: names, shapes and dtypes from headers; data on demand."""

    def __init__(self, directory: Path, infos: dict[str, TensorInfo], fmt: str):
        self.directory = directory
        self.infos = infos
        self.format = fmt
        self._maps: dict[Path, mmap.mmap] = {}
        self._bin: dict[Path, dict[str, torch.Tensor]] = {}
        self._bin_ranges: dict[Path, list[tuple[int, int]]] = {}

    @classmethod
    def open(cls, directory: str | Path) -> "Checkpoint":
        directory = Path(directory)
        index = _first(directory, ["model.safetensors.index.json"])
        if index:
            return cls(directory, _from_index(index, read_safetensors_header), "safetensors")
        single = _first(directory, ["model.safetensors"])
        if single:
            return cls(directory, read_safetensors_header(single), "safetensors")
        loose = sorted(directory.glob("*.safetensors"))
        if loose:
            infos: dict[str, TensorInfo] = {}
            for f in loose:
                infos.update(read_safetensors_header(f))
            return cls(directory, infos, "safetensors")
        bin_index = _first(directory, ["pytorch_model.bin.index.json"])
        if bin_index:
            return cls(directory, _from_index(bin_index, _read_bin_header), "bin")
        single_bin = _first(directory, ["pytorch_model.bin"])
        if single_bin:
            return cls(directory, _read_bin_header(single_bin), "bin")
        raise InputError(f"{directory}: no model weights found (expected model.safetensors, "
                         "model.safetensors.index.json, pytorch_model.bin or its index)")

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def read(self, name: str) -> torch.Tensor:
        """The stored tensor, as stored (dtype unchanged); zero-copy for safetensors."""
        info = self.infos[name]
        if self.format == "bin":
            return self._bin_file(info.file)[name]
        mm = self._map(info.file)
        if info.numel == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "buffer is not writable": callers never write inputs
            flat = torch.frombuffer(mm, dtype=info.dtype, count=info.numel, offset=info.start)
        return flat.view(info.shape)

    def release(self, name: str) -> None:
        """Drop the mapped pages of one tensor from this process's resident memory."""
        info = self.infos[name]
        if self.format == "bin":
            state = self._bin.get(info.file)
            if state is not None and name in state:
                _release_file_pages(state[name], self._bin_ranges.get(info.file, []))
            return
        mm = self._maps.get(info.file)
        if mm is None or not hasattr(mm, "madvise"):
            return
        start = info.start // PAGE * PAGE
        try:
            mm.madvise(mmap.MADV_DONTNEED, start, info.end - start)
        except (OSError, ValueError):
            pass

    def _map(self, path: Path) -> mmap.mmap:
        mm = self._maps.get(path)
        if mm is None:
            with open(path, "rb") as f:
                # A private mapping: a stray write can never reach the user's file.
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            self._maps[path] = mm
        return mm

    def _bin_file(self, path: Path) -> dict[str, torch.Tensor]:
        state = self._bin.get(path)
        if state is None:
            state = _load_bin(path)
            self._bin[path] = state
            self._bin_ranges[path] = file_mappings(path)
        return state

    def close(self) -> None:
        self._bin.clear()
        self._bin_ranges.clear()
        for mm in self._maps.values():
            try:
                mm.close()
            except BufferError:
                pass  # a view is still alive; the map closes when it is collected
        self._maps.clear()


def _first(directory: Path, names: list[str]) -> Optional[Path]:
    for name in names:
        if (directory / name).is_file():
            return directory / name
    return None


def _from_index(index: Path, read_header) -> dict[str, TensorInfo]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise InputError(f"{index}: unreadable index ({err}); re-download or re-save the model") from None
    problems: list[str] = []
    infos: dict[str, TensorInfo] = {}
    for shard in sorted(set(weight_map.values())):
        path = index.parent / shard
        if not path.is_file():
            problems.append(f"{index}: shard {shard} is listed but missing; re-download the model")
            continue
        try:
            infos.update(read_header(path))
        except InputError as err:
            problems.extend(err.problems)
    missing = [n for n, shard in weight_map.items() if n not in infos and (index.parent / shard).is_file()]
    if missing:
        problems.append(f"{index}: {len(missing)} tensors listed in the index are not in their shards "
                        f"(e.g. {missing[0]}); the checkpoint is incomplete")
    if problems:
        raise InputError(problems)
    return {n: infos[n] for n in weight_map if n in infos}


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as err:  # pickle errors, zip errors, weights_only refusals
        raise InputError(f"{path}: cannot read PyTorch checkpoint ({type(err).__name__}: {err}); "
                         "it may be corrupt or contain non-tensor objects (weights_only loading is enforced)") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def file_mappings(path: Path) -> list[tuple[int, int]]:
    """Address ranges where this process maps ``path`` (Linux; elsewhere none)."""
    target = str(Path(path).resolve())
    ranges = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].rstrip("\n") == target:
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    ranges.append((start, end))
    except OSError:
        return []
    return ranges


_MADV_DONTNEED = 4  # Linux


def _madvise():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    fn.restype = ctypes.c_int
    return fn


_MADVISE = _madvise() if os.name == "posix" and mmap.PAGESIZE > 0 else None


def _release_file_pages(tensor: torch.Tensor, ranges: list[tuple[int, int]]) -> None:
    """Drop the whole pages of ``tensor``'s storage, if they lie in one of ``ranges``."""
    if _MADVISE is None or not ranges:
        return
    storage = tensor.untyped_storage()
    begin, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
    if not any(lo <= begin and end <= hi for lo, hi in ranges):
        return
    start = -(-begin // PAGE) * PAGE  # whole pages only: neighbours keep theirs
    stop = end // PAGE * PAGE
    if stop > start:
        _MADVISE(start, stop - start, _MADV_DONTNEED)


def _read_bin_header(path: Path) -> dict[str, TensorInfo]:
    # mmap=True means this reads the pickle and maps the storage, not the weights.
    state = _load_bin(path)
    return {name: TensorInfo(name, path, t.dtype, tuple(t.shape)) for name, t in state.items()}


def dtype_from_name(name: str) -> torch.dtype:
    aliases = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
               "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
               "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64}
    try:
        return aliases[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use float32, float16 or bfloat16") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")

