"""Per-input statistics given in a file, e.g. the coefficients ``mergesmith dam`` learned.

A method parameter declared with ``Param(stats_file=True)`` names a safetensors file.
Its entry ``"<tensor name>:<k>"`` is a statistic of input ``k`` (the k-th source of
the recipe, the implicit base model last) of that output tensor; the engine streams
it beside the weights into ``TensorGroup.stats[k][<parameter name>]``. A tensor
without an entry gets none, and the method decides what that means.

Everything is checked at plan time, from the file's header only, and reported
together: a missing or unreadable file, an entry that is not a float tensor, an
entry whose shape does not broadcast to its tensor's shape, and an entry that
matches no tensor and input of the merge (a file made for other models).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import safe_open

from mergesmith.calibrate.store import StatRef
from mergesmith.errors import InputError


def entry_key(tensor_name: str, k: int) -> str:
    return f"{tensor_name}:{k}"


def setting_files(setting: Any) -> list[str]:
    """The file names a parameter setting can resolve to (a scalar, or the values of a filter list)."""
    if isinstance(setting, str):
        return [setting]
    if isinstance(setting, list):
        return [c["value"] for c in setting if isinstance(c, dict) and isinstance(c.get("value"), str)]
    return []


def _read_header(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    out = {}
    with safe_open(str(path), "pt") as f:
        for key in f.keys():
            sl = f.get_slice(key)
            out[key] = (tuple(sl.get_shape()), sl.get_dtype())
    return out


_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def attach_stats_files(plan: Any, names: list[str]) -> None:
    """Record in each planned tensor the file statistics of each input; raise one InputError listing problems."""
    where = plan.recipe.source_name
    headers: dict[str, Optional[dict[str, tuple[tuple[int, ...], str]]]] = {}
    used: dict[str, set[str]] = {}
    problems: list[str] = []
    for name in names:
        for task in plan.tensors:
            value = task.params.get(name)
            if not isinstance(value, str):
                continue
            if value not in headers:
                path = Path(value).expanduser()
                try:
                    headers[value] = _read_header(path)
                except FileNotFoundError:
                    headers[value] = None
                    problems.append(f"{where}: parameters.{name} = {value}: no such file; give the file "
                                    "written beside this recipe (e.g. by mergesmith dam)")
                except Exception as err:  # safetensors raises its own error types for a damaged header
                    headers[value] = None
                    problems.append(f"{where}: parameters.{name} = {value}: not a readable safetensors file "
                                    f"({type(err).__name__}: {err}); write it again")
                used[value] = set()
            header = headers[value]
            if header is None:
                continue
            if task.stats is None:
                task.stats = [{} for _ in task.inputs]
            for k in range(len(task.inputs)):
                key = entry_key(task.name, k)
                if key not in header:
                    continue
                used[value].add(key)
                shape, dtype = header[key]
                if dtype not in _FLOAT_DTYPES:
                    problems.append(f"{value}: entry {key} is {dtype}, not a float tensor")
                    continue
                try:
                    fits = torch.broadcast_shapes(shape, task.shape) == tuple(task.shape)
                except RuntimeError:
                    fits = False
                if not fits:
                    problems.append(f"{value}: entry {key} has shape {list(shape)}, which does not broadcast to "
                                    f"the tensor's shape {list(task.shape)} (one value per input column is "
                                    f"[{task.shape[-1] if task.shape else 1}]); the file was made for other models")
                    continue
                task.stats[k][name] = StatRef(Path(value).expanduser(), key, tuple(shape))
    for value, header in headers.items():
        if header is None:
            continue
        unused = sorted(set(header) - used[value])
        if unused:
            more = f" and {len(unused) - 3} more" if len(unused) > 3 else ""
            problems.append(f"{value}: {len(unused)} entries match no input of this merge ({', '.join(unused[:3])}"
                            f"{more}); entries are named <tensor>:<input position> and the recipe must list the "
                            "same models, in the same order, as the run that wrote the file")
    if problems:
        raise InputError(problems)
