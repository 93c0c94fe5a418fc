"""Find and open the models a recipe names: their configs and checkpoint headers, never a weight."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from mergesmith.checkpoint.config import read_config
from mergesmith.checkpoint.layout import num_layers, split_layer_name
from mergesmith.checkpoint.lora import LoraCheckpoint, split_lora_ref
from mergesmith.checkpoint.reader import Checkpoint
from mergesmith.errors import InputError


@dataclass
class ModelInfo:
    ref: str  # as written in the recipe
    path: Path
    config: dict[str, Any]
    checkpoint: Checkpoint | LoraCheckpoint
    layers: int

    @property
    def names(self) -> set[str]:
        return set(self.checkpoint.infos)


def open_models(refs: list[str], where: str) -> tuple[list[ModelInfo], list[str], dict[str, Path]]:
    """Resolve every model reference, read configs and headers.

    Returns the models that opened, every problem found, and every input path
    (model folders and LoRA adapter folders, by the reference that names them).
    """
    problems: list[str] = []
    located: list[tuple[str, Path, Optional[Path]]] = []
    input_paths: dict[str, Path] = {}
    for ref in refs:
        model_ref, lora_ref = split_lora_ref(ref)
        try:
            path = resolve_model_path(model_ref)
            input_paths[model_ref] = path
            adapter = resolve_model_path(lora_ref) if lora_ref else None
            if adapter is not None:
                input_paths[lora_ref] = adapter
            located.append((ref, path, adapter))
        except InputError as err:
            problems.extend(f"{where}: {p}" for p in err.problems)
    infos = []
    for ref, path, adapter in located:
        config = None
        try:
            config = read_config(path / "config.json")
        except InputError as err:  # still open the weights below: their problems are reported too
            problems.extend(f"{where}: {ref}: {p}" for p in err.problems)
        try:
            ckpt = Checkpoint.open(path)
            if adapter is not None:
                ckpt = LoraCheckpoint.open(ckpt, adapter)
        except InputError as err:
            problems.extend(f"{where}: {ref}: {p}" for p in err.problems)
            continue
        if config is None:
            ckpt.close()
            continue
        layers = num_layers(config)
        if layers is None:
            layers = len({split_layer_name(n).index for n in ckpt.infos if split_layer_name(n)})
        infos.append(ModelInfo(ref, path, config, ckpt, layers))
    archs = {m.ref: (m.config.get("architectures") or [m.config.get("model_type", "?")])[0] for m in infos}
    if len(set(archs.values())) > 1:
        problems.append(f"{where}: the models have different architectures "
                        f"({', '.join(f'{k}: {v}' for k, v in archs.items())}); merge models of one architecture")
    return infos, problems, input_paths


def resolve_model_path(ref: str) -> Path:
    """A local folder, or a Hugging Face Hub repo id downloaded through huggingface_hub."""
    path = Path(ref).expanduser()
    if path.is_dir():
        return path
    looks_like_repo = ref.count("/") == 1 and not ref.startswith((".", "/", "~")) and not path.exists()
    if not looks_like_repo:
        raise InputError(f"{ref}: no such model folder; check the path")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(ref, allow_patterns=["*.json", "*.safetensors", "*.bin", "*.model",
                                                           "*.txt", "*.jinja"]))
    except Exception as err:  # offline, unknown repo, gated repo, ...
        raise InputError(f"{ref}: not a local folder, and fetching it from the Hugging Face Hub failed "
                         f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); check the path, "
                         "or go online, or point HF_HOME at a cache that has it") from None


@contextlib.contextmanager
def closed_on_error(models: list[ModelInfo]):
    """Close the models' checkpoints if planning fails after opening them."""
    try:
        yield
    except BaseException:
        for m in models:
            m.checkpoint.close()
        raise
