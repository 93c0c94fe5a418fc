"""The statistics cache: one folder per (model, kind, data, settings), found by a hash.

    <cache>/<kind>-<hash>/index.json           what is where, and how it was made
    <cache>/<kind>-<hash>/<kind>-00000.safetensors ...  one file per collection pass

The hash covers the model files' identity (each file's name, size and modification
time, so a re-saved model is a new model), the calibration data (the selected
items and their task settings: what the rendered text depends on), ``samples``,
``max_length`` and ``seed``. ``batch_size`` and ``memory`` are left out: they change
only the order of floating-point sums. A folder appears only complete (written
under a temporary name, then renamed), so an interrupted run leaves no entry that
a later merge would trust.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open

FORMAT_VERSION = 1


def default_cache_dir() -> Path:
    env = os.environ.get("MERGESMITH_CACHE")
    return Path(env).expanduser() / "calibration" if env else Path.home() / ".cache" / "mergesmith" / "calibration"


def model_identity(paths: list[Path]) -> list[tuple[str, str, int, int]]:
    """(folder, file name, size, mtime) of every file of the model folders, sorted."""
    out = []
    for folder in paths:
        folder = folder.resolve()
        for f in sorted(folder.iterdir()):
            if f.is_file() and not f.name.startswith("."):
                st = f.stat()
                out.append((str(folder), f.name, st.st_size, st.st_mtime_ns))
    return out


def cache_key(kind: str, model_paths: list[Path], data: str, samples: int, max_length: int, seed: int,
              include_answers: bool = False) -> str:
    record = {"version": FORMAT_VERSION, "kind": kind, "model": model_identity(model_paths), "data": data,
              "samples": samples, "max_length": max_length, "seed": seed}
    if include_answers:  # only then: prompt-only entries keep the keys they were cached under
        record["include_answers"] = True
    return f"{kind}-{hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:24]}"


@dataclass(frozen=True)
class StatRef:
    """Where one statistic of one tensor lies: a safetensors key, or an inline scalar."""

    file: Optional[Path]
    key: str
    shape: tuple[int, ...]
    value: Optional[float] = None

    @property
    def nbytes(self) -> int:
        n = 4
        for d in self.shape:
            n *= d
        return n

    def read(self, rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """The statistic as stored (``StatsStore.read``); how the engine reads it, beside the weights."""
        return StatsStore.read(self, rows)


class StatsStore:
    """A finished cache entry, read lazily: ``refs(tensor_name)`` then ``read(ref)``."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.index = json.loads((folder / "index.json").read_text())
        self.kind: str = self.index["kind"]
        self._shapes: dict[tuple[str, str], tuple[int, ...]] = {}

    def _shape(self, file: str, key: str) -> tuple[int, ...]:
        if (file, key) not in self._shapes:
            with safe_open(str(self.folder / file), "pt") as f:
                for k in f.keys():
                    self._shapes[(file, k)] = tuple(f.get_slice(k).get_shape())
        return self._shapes[(file, key)]

    def refs(self, tensor_name: str) -> dict[str, StatRef]:
        """The statistics this entry holds for ``tensor_name`` (empty when none)."""
        where = self.index["tensors"].get(tensor_name)
        if where is None:
            return {}
        file, key = where
        out = {self.kind: StatRef(self.folder / file, key, self._shape(file, key))}
        if self.kind == "fisher":
            out["fisher_norm"] = StatRef(None, "fisher_norm", (), float(self.index["fisher_norm"]))
        return out

    @staticmethod
    def read(ref: StatRef, rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """The statistic as stored; ``rows``: only rows ``lo:hi`` of its first axis (only their bytes
        are read), for a tensor merged in row blocks. An inline scalar is read whole either way."""
        if ref.value is not None:
            return torch.tensor(ref.value, dtype=torch.float64)
        with safe_open(str(ref.file), "pt") as f:
            if rows is None:
                return f.get_tensor(ref.key)
            return f.get_slice(ref.key)[rows[0]:rows[1]]


class EntryWriter:
    """A cache entry being written under a temporary name; ``commit`` makes it visible."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)

    def commit(self, index: dict) -> Path:
        (self.tmp / "index.json").write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
        if self.folder.exists():  # a concurrent run finished the same entry first: the same content
            shutil.rmtree(self.tmp, ignore_errors=True)
        else:
            os.replace(self.tmp, self.folder)
        return self.folder

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def remove_partial_entries(cache_dir: Path, pid: int) -> list[Path]:
    """Remove the entries process ``pid`` was still writing in ``cache_dir`` (it was stopped or died):
    they were never committed, so no merge would read them, but they hold disk space."""
    removed = []
    if Path(cache_dir).is_dir():
        for tmp in Path(cache_dir).glob(f".*.tmp-{pid}"):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed
