"""LoRA model references: ``base+adapter`` read as if the adapter were merged in.

mergekit writes a model plus a PEFT LoRA adapter as ``path/to/model+path/to/lora``
(or ``{model: {path: ...}, lora: {path: ...}}``) and merges the adapter into the
model before anything else. We do the same per tensor, while streaming: reading
an adapted weight returns ``W + scale * B @ A`` (for an embedding,
``W + scale * (B @ A)^T``), with ``scale = alpha / r`` (``alpha / sqrt(r)`` with
rsLoRA) and ``alpha`` taken from ``alpha_pattern`` where a pattern matches the
module. The sum is computed in float32 and rounded to the weight's dtype once,
as PEFT's ``merge_and_unload`` does (it loads adapters in float32), so a
reference gives the same tensors as merging the adapter with PEFT and saving
the result.

Everything is checked from the adapter's config and safetensors header before
any weight is read: the PEFT type, options we do not apply (DoRA,
``fan_in_fan_out``, ``modules_to_save``, trainable tokens), that every adapted
module is a weight of the model and that the shapes agree.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from mergesmith.checkpoint.jsonfile import read_json_file, type_name
from mergesmith.checkpoint.reader import Checkpoint, read_safetensors_header
from mergesmith.errors import InputError

PREFIX = "base_model.model."
_PAIRS = {"lora_A": ("lora_B", False), "lora_embedding_A": ("lora_embedding_B", True)}


def split_lora_ref(ref: str) -> tuple[str, Optional[str]]:
    """``"model+lora"`` -> ``("model", "lora")``; a plain reference -> ``(ref, None)``."""
    if "+" not in ref:
        return ref, None
    parts = ref.split("+")
    if len(parts) != 2 or not all(p.strip() for p in parts):
        raise ValueError(f"{ref!r}: a LoRA reference is 'model+lora', with exactly one '+'")
    return parts[0].strip(), parts[1].strip()


@dataclass(frozen=True)
class _Delta:
    a: str  # adapter tensor names
    b: str
    scale: float
    embedding: bool  # delta is (B @ A)^T


def pattern_value(patterns: dict, module: str, default):
    """PEFT's rule: a pattern key applies when it matches the end of the module name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


class LoraCheckpoint:
    """A model checkpoint with a LoRA adapter folded into the tensors it adapts.

    Same interface as ``Checkpoint``: names, shapes and dtypes are the model's.
    """

    def __init__(self, base: Checkpoint, adapter: Checkpoint, deltas: dict[str, _Delta],
                 replaced: dict[str, str]):
        self.base = base
        self.adapter = adapter
        self.deltas = deltas
        self.replaced = replaced  # model weight -> the adapter's saved copy of it
        self.directory = base.directory
        self.infos = base.infos
        self.format = base.format

    @classmethod
    def open(cls, base: Checkpoint, adapter_dir: Path) -> "LoraCheckpoint":
        """Validate the adapter against ``base``; raises InputError listing every problem."""
        config = read_adapter_config(adapter_dir)
        weights = adapter_dir / "adapter_model.safetensors"
        if not weights.is_file():
            raise InputError(f"no adapter_model.safetensors in the adapter folder {adapter_dir} (adapters "
                             "saved as .bin are not supported; re-save with safe_serialization=True)")
        infos = read_safetensors_header(weights)
        deltas, replaced, problems = _plan(config, infos, base)
        if problems:
            raise InputError(problems)
        return cls(base, Checkpoint(adapter_dir, infos, "safetensors"), deltas, replaced)

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def read(self, name: str) -> torch.Tensor:
        saved = self.replaced.get(name)
        weight = self.base.read(name) if saved is None else \
            self.adapter.read(saved).to(self.infos[name].dtype)
        delta = self.deltas.get(name)
        if delta is None:
            return weight
        a = self.adapter.read(delta.a).float()
        b = self.adapter.read(delta.b).float()
        product = b @ a
        if delta.embedding:
            product = product.T
        # In float32 and rounded once: what PEFT's merge gives (it loads adapters in float32).
        return (weight.float() + product * delta.scale).to(weight.dtype)

    def read_rows(self, name: str, lo: int, hi: int) -> torch.Tensor:
        """Rows ``lo:hi`` of ``read(name)``; an adapted tensor is computed whole first, since
        a product of row blocks need not round as the whole product does."""
        if name in self.deltas or name in self.replaced:
            return self.read(name)[lo:hi]
        return self.base.read_rows(name, lo, hi)

    def reads_rows_cheaply(self, name: str) -> bool:
        return name not in self.deltas and name not in self.replaced

    def release(self, name: str) -> None:
        self.base.release(name)
        if name in self.replaced:
            self.adapter.release(self.replaced[name])
        delta = self.deltas.get(name)
        if delta is not None:
            self.adapter.release(delta.a)
            self.adapter.release(delta.b)

    def close(self) -> None:
        self.base.close()
        self.adapter.close()


def read_adapter_config(adapter_dir: Path) -> dict:
    """``adapter_config.json``, strictly: the fields we compute with must have their types."""
    path = adapter_dir / "adapter_config.json"
    fix = "fix adapter_config.json or re-save the adapter with PEFT"
    try:
        config = read_json_file(path, "adapter config", fix=fix)
    except FileNotFoundError:
        raise InputError(f"no adapter_config.json in {adapter_dir}; is it a PEFT LoRA adapter?") from None
    if not isinstance(config, dict):
        raise InputError(f"{path}: the adapter config is {type_name(config)}, not a JSON object; {fix}")
    problems = []

    def wrong(key: str, value, expected: str) -> None:
        problems.append(f"{path}: {key} = {value!r} ({type_name(value)}) must be {expected}; {fix}")

    def is_number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    if not isinstance(config.get("peft_type", "LORA"), str):
        wrong("peft_type", config["peft_type"], "a string")
    if "lora_alpha" in config and not is_number(config["lora_alpha"]):
        wrong("lora_alpha", config["lora_alpha"], "a number")
    if config.get("use_rslora") is not None and not isinstance(config["use_rslora"], bool):
        wrong("use_rslora", config["use_rslora"], "true or false")
    patterns = config.get("alpha_pattern")
    if patterns is not None:
        if not isinstance(patterns, dict):
            wrong("alpha_pattern", patterns, "an object mapping module patterns to numbers")
        for key, value in (patterns.items() if isinstance(patterns, dict) else ()):
            if not is_number(value):
                wrong(f"alpha_pattern[{key!r}]", value, "a number")
            try:
                re.compile(key)
            except re.error as err:
                problems.append(f"{path}: alpha_pattern key {key!r} is not a regular expression ({err}); {fix}")
    if problems:
        raise InputError(problems)
    return config


def _plan(config: dict, infos: dict, base: Checkpoint) -> tuple[dict[str, _Delta], dict[str, str], list[str]]:
    """The low-rank deltas, the weights the adapter saved whole, and every problem."""
    label = "LoRA adapter"
    problems = []
    kind = config.get("peft_type", "LORA")
    if kind != "LORA":
        problems.append(f"{label}: adapter type {kind!r} is not LoRA; only LoRA adapters can be merged")
    unsupported = {"use_dora": "DoRA", "fan_in_fan_out": "fan_in_fan_out (Conv1D layers)",
                   "modules_to_save": "modules_to_save", "trainable_token_indices": "trainable tokens"}
    for key, what in unsupported.items():
        if config.get(key):
            problems.append(f"{label}: the adapter uses {what}, which mergesmith does not apply yet; "
                            "merge it into its model with PEFT (merge_and_unload) and reference the result")
    alpha, rslora = config.get("lora_alpha", 8), bool(config.get("use_rslora"))
    alpha_pattern = config.get("alpha_pattern") or {}
    deltas: dict[str, _Delta] = {}
    replaced: dict[str, str] = {}
    used: set[str] = set()
    for name in infos:
        saved = re.fullmatch(r"(.+)\.base_layer\.weight", name)
        if saved:  # PEFT saves targeted embedding layers whole; loading it replaces the model's
            target = saved.group(1).removeprefix(PREFIX) + ".weight"
            used.add(name)
            if target not in base.infos or tuple(base.infos[target].shape) != tuple(infos[name].shape):
                problems.append(f"{label}: it saves {target} with shape {list(infos[name].shape)}, which "
                                "does not fit the model (a resized vocabulary?); merge it with PEFT "
                                "(merge_and_unload) and reference the result")
            else:
                replaced[target] = name
            continue
        match = re.fullmatch(r"(.+)\.(lora_A|lora_embedding_A)(?:\.weight)?", name)
        if not match:
            continue
        module, kind_a = match.groups()
        b_kind, embedding = _PAIRS[kind_a]
        b_name = name.replace(f".{kind_a}", f".{b_kind}")
        target = module.removeprefix(PREFIX) + ".weight"
        used.update((name, b_name))
        if b_name not in infos:
            problems.append(f"{label}: {name} has no matching {b_kind} tensor; the adapter is incomplete")
            continue
        if target not in base.infos:
            problems.append(f"{label}: the adapter changes {target}, which the model does not have; "
                            "is it an adapter for this model?")
            continue
        a_shape, b_shape, w_shape = infos[name].shape, infos[b_name].shape, base.infos[target].shape
        rank = a_shape[0]
        out_shape = (a_shape[1], b_shape[0]) if embedding else (b_shape[0], a_shape[1])
        if len(a_shape) != 2 or len(b_shape) != 2 or b_shape[1] != rank or out_shape != tuple(w_shape):
            problems.append(f"{label}: {target}: adapter shapes A {list(a_shape)}, B {list(b_shape)} do not "
                            f"fit the weight {list(w_shape)}; is it an adapter for this model?")
            continue
        module_key = module.removeprefix(PREFIX)
        a = pattern_value(alpha_pattern, module_key, alpha)
        scale = a / math.sqrt(rank) if rslora else a / rank
        deltas[target] = _Delta(name, b_name, scale, embedding)
    others = sorted(set(infos) - used)
    if others:
        problems.append(f"{label}: the adapter holds tensors that are not LoRA pairs ({len(others)}, e.g. "
                        f"{others[0]}); merge it with PEFT (merge_and_unload) and reference the result")
    if not deltas and not problems:
        problems.append(f"{label}: the adapter holds no LoRA weights")
    return deltas, replaced, problems
