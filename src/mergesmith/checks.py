"""Argument checks that run before any expensive work.

Each ``*_problems`` function returns the problems it finds as lines (empty: fine),
so that a command can gather every problem of every argument and raise them as
one ``InputError`` (exit 2), instead of failing on the first one, or worse, after
minutes of loading, merging or training. ``prepare_output_dir`` then creates the
output folder and writes a probe file in it, so that an output that cannot be
written is found before the work whose result it would lose.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

from mergesmith.errors import InputError
from mergesmith.paths import output_problems

PathLike = Union[str, Path]

DEVICE_RE = re.compile(r"^(cpu|auto|mps|cuda(:\d+)?)$")


def at_least(flag: str, value: Any, minimum: int, meaning: str = "", *, optional: bool = False) -> list[str]:
    """``value`` must be an integer >= ``minimum`` (or None when ``optional``)."""
    if value is None and optional:
        return []
    why = f" ({meaning})" if meaning else ""
    if isinstance(value, bool) or not isinstance(value, int):
        return [f"{flag} {value!r}: must be a whole number of at least {minimum}{why}"]
    if value < minimum:
        return [f"{flag} {value}: must be at least {minimum}{why}"]
    return []


def device_problems(device: Any, flag: str = "--device", kinds: tuple[str, ...] = ("cpu", "cuda", "mps")
                    ) -> list[str]:
    """``cpu``, ``cuda``, ``cuda:N``, ``mps`` or ``auto`` (of them, those in ``kinds``); a GPU must exist
    here. None is fine.

    The one check of a device name, for the commands' flags and the merge engine's option alike.
    ``flag`` names the value: a flag (``--device 'gpu': not a device``) or, for the engine's
    ``MergeOptions.device``, a field (``device = 'gpu' is not a device``).
    """
    if device is None:
        return []
    import torch

    if isinstance(device, torch.device):
        device = str(device)
    is_flag = flag.startswith("-")
    if not isinstance(device, str) or not DEVICE_RE.match(device) or device.split(":")[0] not in (*kinds, "auto"):
        named = f"{flag} {device!r}:" if is_flag else f"{flag} = {device!r} is"
        return [f"{named} not a device; use cpu, cuda, cuda:N (N counts from 0) or auto"]
    named = f"{flag} {device}:" if is_flag else f"{flag} = {device}:"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            why = "this torch was built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            return [f"{named} CUDA is not available on this machine ({why}); use --device cpu (or auto, which "
                    "picks a GPU when there is one)"]
        count = torch.cuda.device_count()
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= count:
            return [f"{named} this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}"]
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        return [f"{named} no Apple GPU is available here; use --device cpu"]
    return []


def resolve_device(device: Optional[str]) -> Optional[str]:
    """``auto`` becomes ``cuda`` when a CUDA device is visible, else ``cpu``; others pass through."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_device(name: str, flag: str = "device") -> "torch.device":
    """The torch device ``name`` means here (``auto``: a GPU when there is one), for the merge math:
    cpu or cuda; an InputError (``device_problems``) when it means none."""
    import torch

    problems = device_problems(str(name), flag, kinds=("cpu", "cuda"))
    if problems:
        raise InputError(problems)
    return torch.device(resolve_device(name))


def choice_problems(flag: str, value: Any, choices: Iterable[str]) -> list[str]:
    choices = list(choices)
    if value in choices:
        return []
    return [f"{flag} {value!r}: not known; use one of {', '.join(choices)}"]


def output_dir_problems(out: PathLike, inputs: Union[Mapping[str, PathLike], Iterable[PathLike]] = (),
                        flag: str = "--out") -> list[str]:
    """Why the folder ``out`` cannot be the output (nothing is created or written).

    An output may not be, contain or lie inside an input (``mergesmith.paths``),
    nor lie under a file, and the nearest folder that exists must be writable.
    """
    problems = output_problems(out, inputs, what=flag)
    if problems:
        return [f"{flag} {p}" for p in problems]
    target = Path(os.path.realpath(Path(out).expanduser()))
    existing = next(p for p in [target, *target.parents] if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        return [f"{flag} {out}: cannot write in {existing} (permission denied or a read-only file system); "
                f"choose another {flag}"]
    return []


def overwritten_inputs(out: PathLike, names: Iterable[str], inputs: Iterable[PathLike],
                       flag: str = "--out") -> list[str]:
    """Input files that writing the files ``names`` into the folder ``out`` would overwrite.

    ``names`` are file names or ``re`` patterns matched against the whole name.
    """
    folder = Path(os.path.realpath(Path(out).expanduser()))
    patterns = [re.compile(n) for n in names]
    problems = []
    for path in inputs:
        real = Path(os.path.realpath(Path(path).expanduser()))
        if real.parent == folder and any(p.fullmatch(real.name) for p in patterns):
            problems.append(f"{flag} {out}: writing {real.name} there would overwrite the input {path}; "
                            f"choose another {flag}")
    return problems


def prepare_output_dir(out: PathLike, flag: str = "--out") -> bool:
    """Create ``out`` and write (then delete) a probe file in it; True when the folder was created.

    The probe finds what ``os.access`` cannot see (a full disk, some network file
    systems) before the work starts.
    """
    target = Path(out).expanduser()
    created = not target.exists()
    probe = target / f".mergesmith-write-probe-{os.getpid()}"
    try:
        target.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"probe")
        probe.unlink()
    except OSError as err:
        if created:
            shutil.rmtree(target, ignore_errors=True)
        raise InputError(f"{flag} {out}: cannot write there ({err.strerror or err}); choose another {flag}") from None
    return created


def remove_if_empty(folder: PathLike) -> None:
    """Remove a folder we created, if nothing was written in it (a run stopped before its outputs)."""
    try:
        Path(folder).rmdir()
    except OSError:
        pass
