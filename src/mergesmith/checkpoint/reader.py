"""Lazy, per-tensor reading of Hugging Face checkpoints.

Opening a checkpoint reads only headers: the safetensors JSON header of each
shard or, for PyTorch ``.bin`` files, the pickle's tensor metadata through a
memory-mapped ``torch.load``. ``read(name)`` then returns one tensor. Headers
and index files are validated completely first (``read_safetensors_header``,
``_from_index``): a truncated, corrupt or hostile file is refused, with every
problem named, before any weight is read.

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
import math
import mmap
import os
import re
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from mergesmith.checkpoint.jsonfile import is_int, parse_json, read_json_file, type_name
from mergesmith.errors import InputError

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS_DTYPES.items()}
# Valid safetensors dtypes that are not plain numbers to average (fp8, fp4, unsigned, complex).
OTHER_SAFETENSORS_DTYPES = frozenset({"F4", "F6_E2M3", "F6_E3M2", "F8_E5M2", "F8_E4M3", "F8_E8M0",
                                      "F8_E4M3FNUZ", "F8_E5M2FNUZ", "U16", "U32", "U64", "C64"})
_ITEMSIZE = {dtype: torch.empty((), dtype=dtype).element_size() for dtype in SAFETENSORS_DTYPES.values()}
_MAX_BYTES = 2**63 - 1
_SURROGATE = re.compile("[\ud800-\udfff]")  # JSON escapes can spell them; UTF-8 cannot hold them
MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_PROBLEMS_PER_FILE = 20
FIX = "the file is corrupt or hostile: re-download it or re-save it with safetensors"
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
    """Parse and validate one safetensors file's header; InputError naming every problem.

    The checks are the format's own (those of the ``safetensors`` library,
    which this refuses at least everything it refuses) and more:

    - the 8-byte length fits the file and at most ``MAX_HEADER_BYTES``; the
      header is UTF-8 (a bad byte is named by its offset), a JSON object, nested
      at most ``MAX_JSON_DEPTH`` deep, and names no key twice;
    - ``__metadata__``, if present, maps strings to strings;
    - every tensor has a known ``dtype``, a ``shape`` of non-negative integers
      and ``data_offsets`` ``[begin, end]`` with ``end - begin`` equal to
      ``prod(shape) * itemsize``;
    - sorted by offset, the tensors tile the data area ``[0, file size - 8 - n)``
      exactly: no gap, no overlap, nothing past the end, nothing after the last.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise InputError(_refusal(path, f"not a safetensors file (only {size} bytes, fewer than the "
                                            "8-byte header length)"))
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES:
            raise InputError(_refusal(path, f"the header length field says {n} bytes, more than the "
                                            f"{MAX_HEADER_BYTES} allowed"))
        if 8 + n > size:
            raise InputError(_refusal(path, f"corrupt or truncated safetensors header (header claims {n} bytes, "
                                            f"file has {size}; a truncated download?)"))
        raw = f.read(n)
    header = parse_json(raw, path, "safetensors header", start=8, duplicates=False, constants=False,
                        fix=FIX)
    if not isinstance(header, dict):
        raise InputError(_refusal(path, f"the safetensors header is {type_name(header)}, not a JSON object"))
    data_len = size - 8 - n
    infos: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    problems: list[str] = []
    for name, entry in header.items():
        if _SURROGATE.search(name):
            problems.append(_refusal(path, f"tensor name {name!r} is not valid Unicode"))
            continue
        if name == "__metadata__":
            if not isinstance(entry, dict):
                problems.append(_refusal(path, f"__metadata__ is {type_name(entry)}; it must map strings to strings"))
                continue
            bad = [k for k, v in entry.items() if not isinstance(v, str) or _SURROGATE.search(k + v)]
            if bad:
                problems.append(_refusal(path, f"__metadata__[{bad[0]!r}] = {_show(entry[bad[0]])} is not a "
                                               "string; __metadata__ must map strings to strings"))
            continue
        parsed = _tensor_entry(entry)
        if isinstance(parsed, str):
            problems.append(_refusal(path, f"tensor {name!r}: {parsed}"))
            continue
        dtype, shape, begin, end = parsed
        infos[name] = TensorInfo(name, path, dtype, shape, 8 + n + begin, 8 + n + end)
        spans.append((begin, end, name))
    if not problems:
        problems = [_refusal(path, p) for p in _coverage_problems(spans, data_len)]
    if len(problems) > MAX_PROBLEMS_PER_FILE:
        problems = problems[:MAX_PROBLEMS_PER_FILE] + [f"{path}: ... and {len(problems) - MAX_PROBLEMS_PER_FILE} "
                                                       "more problems like these"]
    if problems:
        raise InputError(problems)
    return infos


def _tensor_entry(entry: object) -> tuple[torch.dtype, tuple[int, ...], int, int] | str:
    """(dtype, shape, begin, end) of one header entry, or what is wrong with it."""
    if not isinstance(entry, dict):
        return f"the entry is {type_name(entry)}, not an object with dtype, shape and data_offsets"
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in entry]
    if missing:
        return f"the entry has no {' or '.join(missing)}"
    code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(code, str) or code not in SAFETENSORS_DTYPES:
        known = ", ".join(sorted(SAFETENSORS_DTYPES))
        if isinstance(code, str) and code in OTHER_SAFETENSORS_DTYPES:
            return (f"dtype {code} is a safetensors dtype mergesmith does not merge (it reads {known}); "
                    "dequantize or convert the model first")
        return f"unknown dtype {_show(code)} (safetensors dtypes mergesmith reads: {known})"
    if not (isinstance(shape, list) and all(is_int(d) and d >= 0 for d in shape)):
        return f"shape {_show(shape)} is not a list of non-negative integers"
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_int(x) and x >= 0 for x in offsets)):
        return f"data_offsets {_show(offsets)} is not a pair [begin, end] of non-negative integers"
    if offsets[1] > _MAX_BYTES:
        return f"data_offsets {_show(offsets)} point beyond any file"
    begin, end = offsets
    if end < begin:
        return f"data_offsets {offsets} end before they begin"
    dtype = SAFETENSORS_DTYPES[code]
    itemsize = _ITEMSIZE[dtype]
    # Zeros aside, a shape whose bytes exceed 2^63 describes no tensor any file can hold
    # (and would overflow the int64 sizes of torch; the library refuses the 2^64 overflow).
    bound = itemsize
    for d in shape:
        bound *= max(d, 1)
        if bound > _MAX_BYTES:
            return f"shape {_show(shape)} of {code} is larger than any tensor can be"
    nbytes = itemsize * math.prod(shape)
    if end - begin != nbytes:
        return (f"data_offsets {offsets} hold {end - begin} bytes, but shape {shape} of {code} "
                f"needs {nbytes}")
    return dtype, tuple(shape), begin, end


def _coverage_problems(spans: list[tuple[int, int, str]], data_len: int) -> list[str]:
    """Where the tensors' byte ranges fail to tile ``[0, data_len)`` exactly."""
    problems = []
    covered, last = 0, None
    for begin, end, name in sorted(spans):
        if begin > covered:
            problems.append(f"bytes [{covered}, {begin}) of the data area belong to no tensor "
                            f"(before tensor {name!r})")
        elif begin < covered:
            problems.append(f"tensor {name!r} at data_offsets [{begin}, {end}] overlaps tensor {last!r}")
        if end > covered:
            covered, last = end, name
    if covered > data_len:
        problems.append(f"tensor {last!r} ends at byte {covered} of the data area, past its end "
                        f"({data_len} bytes); the file is truncated (an interrupted download?)")
    elif covered < data_len:
        problems.append(f"the last {data_len - covered} bytes of the file belong to no tensor")
    return problems


def _refusal(path: Path, what: str) -> str:
    return f"{path}: {what}; {FIX}"


def _show(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


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
            return cls(directory, _from_loose_files(loose), "safetensors")
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

    def read_rows(self, name: str, lo: int, hi: int) -> torch.Tensor:
        """Rows ``lo:hi`` (along the first axis) of the stored tensor, as stored.

        For safetensors a zero-copy view of just those rows' bytes, so only their pages
        are ever faulted in; ``.bin`` tensors are views of a mapping already.
        """
        info = self.infos[name]
        if self.format == "bin" or info.numel == 0 or hi <= lo:
            return self.read(name)[lo:hi]
        row = info.numel // info.shape[0]
        mm = self._map(info.file)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "buffer is not writable": callers never write inputs
            flat = torch.frombuffer(mm, dtype=info.dtype, count=(hi - lo) * row,
                                    offset=info.start + lo * row * _ITEMSIZE[info.dtype])
        return flat.view((hi - lo, *info.shape[1:]))

    def reads_rows_cheaply(self, name: str) -> bool:
        """Whether ``read_rows`` costs only the rows read (always, for a plain checkpoint)."""
        return True

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
        """Forget the mapped files; each is unmapped once the last tensor viewing it is collected.

        Not ``mmap.close()``: ``torch.frombuffer`` keeps a reference to the map
        but no buffer export, so closing would unmap the pages under live views
        and the next access would crash the process (say, a worker thread still
        reading when a merge is interrupted).
        """
        self._bin.clear()
        self._bin_ranges.clear()
        self._maps.clear()


def _from_loose_files(files: list[Path]) -> dict[str, TensorInfo]:
    """Tensors of several safetensors files without an index; a name in two files is ambiguous."""
    infos: dict[str, TensorInfo] = {}
    problems: list[str] = []
    for f in files:
        try:
            header = read_safetensors_header(f)
        except InputError as err:
            problems.extend(err.problems)
            continue
        for name, info in header.items():
            if name in infos:
                problems.append(f"{f}: tensor {name!r} is also in {infos[name].file.name}, and no index "
                                "says which to use; remove the stray file or re-download the model")
            infos.setdefault(name, info)
    if problems:
        raise InputError(problems)
    return infos


def _first(directory: Path, names: list[str]) -> Optional[Path]:
    for name in names:
        if (directory / name).is_file():
            return directory / name
    return None


def _from_index(index: Path, read_header) -> dict[str, TensorInfo]:
    """Each tensor an index lists, read from the header of the shard it names.

    The index must be a JSON object whose ``weight_map`` maps tensor names to
    shard file names; a shard must lie inside the model folder (no ``..``, no
    absolute path, no symlink leading out of it, except into the blob store of
    a Hugging Face cache, where ``snapshots/<rev>/`` links its files).
    """
    weight_map = _weight_map(index)
    problems: list[str] = []
    shards: dict[str, dict[str, TensorInfo]] = {}
    for shard in sorted(set(weight_map.values())):
        outside = _shard_outside(index.parent, shard)
        if outside:
            problems.append(f"{index}: shard {shard!r} {outside}; the index is corrupt or hostile: "
                            "re-download the model")
            continue
        path = index.parent / shard
        if not path.is_file():
            problems.append(f"{index}: shard {shard} is listed but missing; re-download the model")
            continue
        try:
            shards[shard] = read_header(path)
        except InputError as err:
            problems.extend(err.problems)
    missing = [(n, shard) for n, shard in weight_map.items() if shard in shards and n not in shards[shard]]
    if missing:
        name, shard = missing[0]
        problems.append(f"{index}: {len(missing)} tensors listed in the index are not in their shards "
                        f"(e.g. {name} in {shard}); the checkpoint is incomplete: re-download the model")
    if problems:
        raise InputError(problems)
    return {n: shards[shard][n] for n, shard in weight_map.items()}


def _weight_map(index: Path) -> dict[str, str]:
    """The index's ``weight_map``, checked to map strings to strings."""
    fix = "re-download the model or re-save it"
    data = read_json_file(index, "index", duplicates=False, fix=fix)
    if not isinstance(data, dict):
        raise InputError(f"{index}: the index is {type_name(data)}, not a JSON object; {fix}")
    if "weight_map" not in data:
        raise InputError(f"{index}: the index has no weight_map; {fix}")
    weight_map = data["weight_map"]
    if not isinstance(weight_map, dict):
        raise InputError(f"{index}: weight_map is {type_name(weight_map)}, not an object mapping tensor "
                         f"names to shard files; {fix}")
    bad = [(k, v) for k, v in weight_map.items() if not isinstance(v, str) or _SURROGATE.search(k + v)]
    if bad:
        name, shard = bad[0]
        raise InputError(f"{index}: weight_map[{name!r}] = {_show(shard)} is not a shard file name "
                         f"({len(bad)} entries like it); {fix}")
    if not isinstance(data.get("metadata", {}), dict):
        raise InputError(f"{index}: metadata is {type_name(data['metadata'])}, not an object; {fix}")
    return weight_map


def _shard_outside(folder: Path, shard: str) -> Optional[str]:
    """Why the shard file name ``shard`` would lead out of ``folder``, or None."""
    parts = re.split(r"[/\\]", shard)
    if not shard or "\0" in shard:
        return "is not a file name"
    if shard.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", shard):
        return "is an absolute path"
    if ".." in parts:
        return "climbs out of the model folder with '..'"
    try:
        root = folder.resolve()
        target = (folder / shard).resolve()
    except (OSError, RuntimeError):  # a symlink loop
        return "cannot be resolved (a symlink loop?)"
    allowed = [root]
    if root.parent.name == "snapshots":  # huggingface_hub: snapshots/<rev>/x -> ../../blobs/<hash>
        allowed.append(root.parent.parent / "blobs")
    if not any(target.is_relative_to(a) for a in allowed):
        return f"is a symlink that leads out of the model folder (to {target})"
    return None


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    fix = "re-download it or re-save it (safetensors is safer)"
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as err:  # pickle errors, zip errors, weights_only refusals
        raise InputError(f"{path}: cannot read PyTorch checkpoint ({type(err).__name__}: {err}); "
                         "it may be corrupt or contain non-tensor objects (weights_only loading is enforced); "
                         f"{fix}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise InputError(f"{path}: the PyTorch checkpoint holds a {type(state).__name__}, not a dict of "
                         f"tensors; {fix}")
    names = [k for k, v in state.items() if isinstance(v, torch.Tensor) and not isinstance(k, str)]
    if names:
        raise InputError(f"{path}: the PyTorch checkpoint names a tensor {names[0]!r}, not a string; {fix}")
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

