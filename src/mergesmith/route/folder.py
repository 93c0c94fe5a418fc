"""What a routed model folder holds, and reading it back with every expert checked.

``OUT/routed.json`` names the router kind, its settings, the fallback threshold and the
models: the base model whose features the router reads (centroid, classifier), each expert
(a folder or ``model+adapter``) with the task names it answers for, and the optional fallback.
Each model's files are recorded with their SHA-256; reading the folder recomputes them and
refuses, naming the file, when an expert changed since the router was fitted.
``OUT/router.safetensors`` holds the router's tensors (centroids, or the classifier's weights).
A reference is absolute, or relative to the folder (``--copy`` writes ``experts/<name>``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch

from mergesmith.checkpoint.lora import split_lora_ref
from mergesmith.errors import InputError

ROUTED_FILE = "routed.json"
ROUTER_WEIGHTS = "router.safetensors"
FORMAT = "mergesmith-routed/1"


@dataclass
class ModelRef:
    name: str
    ref: str  # a folder, or "model+adapter"
    tasks: list[str] = field(default_factory=list)
    files: dict[str, dict[str, str]] = field(default_factory=dict)  # folder part -> file name -> sha256

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "ref": self.ref, "tasks": self.tasks, "files": self.files}


@dataclass
class RoutedModel:
    folder: Path
    kind: str
    experts: list[ModelRef]
    base: Optional[ModelRef] = None
    fallback: Optional[ModelRef] = None
    threshold: Optional[float] = None
    settings: dict[str, Any] = field(default_factory=dict)
    router: dict[str, torch.Tensor] = field(default_factory=dict)

    def resolve(self, model: ModelRef) -> str:
        """The reference with folder-relative parts made absolute, as a loader takes it."""
        path, adapter = split_lora_ref(model.ref)
        parts = [str(self.folder / p) if not Path(p).is_absolute() else p for p in (path, adapter) if p]
        return "+".join(parts)

    def to_json(self) -> dict[str, Any]:
        ref = lambda m: m.to_json() if m is not None else None  # noqa: E731
        return {"format": FORMAT, "kind": self.kind, "experts": [e.to_json() for e in self.experts],
                "base_model": ref(self.base), "fallback": ref(self.fallback), "threshold": self.threshold,
                "settings": self.settings}


def is_routed_folder(path: Union[str, Path]) -> bool:
    return (Path(path).expanduser() / ROUTED_FILE).is_file()


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_digests(folder: Path) -> dict[str, str]:
    """SHA-256 of every file directly in a model or adapter folder (hidden files left out)."""
    return {p.name: file_digest(p) for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")}


def ref_digests(resolved: str) -> dict[str, dict[str, str]]:
    path, adapter = split_lora_ref(resolved)
    out = {"model": folder_digests(Path(path))}
    if adapter:
        out["adapter"] = folder_digests(Path(adapter))
    return out


def changed_files(label: str, resolved: str, recorded: dict[str, dict[str, str]]) -> list[str]:
    """Why the files of ``resolved`` are not the ones recorded when the router was built."""
    path, adapter = split_lora_ref(resolved)
    problems = []
    for part, folder in (("model", path), ("adapter", adapter)):
        if part not in recorded:
            continue
        if folder is None or not Path(folder).is_dir():
            problems.append(f"{label}: {folder}: no such folder")
            continue
        now = folder_digests(Path(folder))
        for name, digest in recorded[part].items():
            if name not in now:
                problems.append(f"{label}: {folder}/{name} is gone")
            elif now[name] != digest:
                problems.append(f"{label}: {folder}/{name} changed since the router was built (SHA-256 differs)")
        problems += [f"{label}: {folder}/{name} is new since the router was built" for name in now
                     if name not in recorded[part]]
    return problems


def _model(entry: Optional[dict]) -> Optional[ModelRef]:
    if entry is None:
        return None
    return ModelRef(entry["name"], entry["ref"], list(entry.get("tasks", [])), dict(entry.get("files", {})))


def read_routed(folder: Union[str, Path], *, verify: bool = True) -> RoutedModel:
    """The routed model in ``folder``; with ``verify``, every model's files checked against their
    recorded SHA-256 (all changes reported together, as one InputError)."""
    folder = Path(folder).expanduser()
    where = folder / ROUTED_FILE
    try:
        spec = json.loads(where.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise InputError(f"{where}: not a readable routed model description ({err})") from None
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        raise InputError(f"{where}: format {spec.get('format') if isinstance(spec, dict) else None!r} is not "
                         f"{FORMAT!r}; rebuild the folder with mergesmith route")
    routed = RoutedModel(folder=folder, kind=spec["kind"], experts=[_model(e) for e in spec["experts"]],
                         base=_model(spec.get("base_model")), fallback=_model(spec.get("fallback")),
                         threshold=spec.get("threshold"), settings=dict(spec.get("settings", {})))
    weights = folder / ROUTER_WEIGHTS
    if weights.is_file():
        from safetensors.torch import load_file
        routed.router = load_file(str(weights))
    if verify:
        problems = []
        for role, model in [("base_model", routed.base), ("fallback", routed.fallback),
                            *((f"expert {e.name!r}", e) for e in routed.experts)]:
            if model is not None:
                problems += changed_files(f"{where}: {role}", routed.resolve(model), model.files)
        if problems:
            raise InputError(problems + [f"{where}: rebuild the routed model with mergesmith route (its router "
                                         "was fitted to the models as they were)"])
    return routed


def write_routed(routed: RoutedModel) -> None:
    from safetensors.torch import save_file

    routed.folder.mkdir(parents=True, exist_ok=True)
    if routed.router:
        save_file({k: v.contiguous() for k, v in routed.router.items()}, str(routed.folder / ROUTER_WEIGHTS))
    (routed.folder / ROUTED_FILE).write_text(json.dumps(routed.to_json(), indent=2) + "\n", encoding="utf-8")
