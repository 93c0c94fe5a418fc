"""PEFT LoRA adapter folders: read one lazily (validated, every problem at once), write one atomically.

An adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` with, per
adapted module ``M``, the tensors ``base_model.model.M.lora_A.weight`` (r x in) and
``base_model.model.M.lora_B.weight`` (out x r), or ``lora_embedding_A`` / ``lora_embedding_B``
(no ``.weight``) for an embedding. Its scale is ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA),
alpha taken from ``alpha_pattern`` where a key matches the module; r is the factors' own rank.

We write every module with ``lora_alpha = r`` and ``use_rslora = false``, so that its scale is 1
and the factors carry everything: a merged adapter's scales are applied exactly once, in the
factors, and a reader that ignores rsLoRA or patterns still folds it right. ``rank_pattern`` and
``alpha_pattern`` list every module whose rank differs from ``r``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from mergesmith.checkpoint.lora import pattern_value, read_adapter_config
from mergesmith.checkpoint.reader import Checkpoint, read_safetensors_header
from mergesmith.checkpoint.writer import OutputTensor, remove_stale_partials, write_safetensors
from mergesmith.errors import InputError, ResourceError
from mergesmith.lora.factors import lora_scale

PREFIX = "base_model.model."
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"

# Config switches of LoRA variants whose delta is not s * B @ A, or that carry more than LoRA pairs.
UNMERGEABLE = {
    "use_dora": "DoRA (use_dora): its magnitude vector rescales the whole weight, so it is no sum of B @ A",
    "lora_bias": "lora_bias: a bias on lora_B",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D layers, as in GPT-2)",
    "modules_to_save": "modules_to_save: whole modules saved beside the LoRA pairs",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "layer_replication": "layer_replication",
    "target_parameters": "target_parameters (LoRA on parameters, e.g. MoE experts)",
    "use_qalora": "QALoRA (use_qalora)",
}


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: where its factors are and what its delta is (s * B @ A, m x n)."""

    name: str  # the module, e.g. model.layers.0.self_attn.q_proj
    a: str  # tensor names in the adapter file
    b: str
    rank: int
    scale: float
    embedding: bool  # PEFT adds (s * B @ A)^T to the weight
    shape: tuple[int, int]  # shape of B @ A

    @property
    def weight_shape(self) -> tuple[int, int]:
        """The shape of the model's weight this module changes."""
        return (self.shape[1], self.shape[0]) if self.embedding else self.shape


@dataclass
class Adapter:
    path: Path
    config: dict
    modules: dict[str, LoraModule]
    checkpoint: Checkpoint
    dtype: torch.dtype

    def factors(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of one module in float32, copied out of the file."""
        spec = self.modules[module]
        a = self.checkpoint.read(spec.a).to(torch.float32, copy=True)
        b = self.checkpoint.read(spec.b).to(torch.float32, copy=True)
        self.checkpoint.release(spec.a)
        self.checkpoint.release(spec.b)
        return a, b

    def close(self) -> None:
        self.checkpoint.close()


def open_adapter(path: Path, label: str) -> tuple[Optional[Adapter], list[str]]:
    """Read an adapter's config and safetensors header (no weights). Returns it, or None, and
    every problem found, each naming ``label`` (how the recipe or command line names it)."""
    path = Path(path)
    if not path.is_dir():
        return None, [f"{label}: {path} is not a folder; give a PEFT LoRA adapter folder"]
    try:
        config = read_adapter_config(path)
    except InputError as err:
        return None, [f"{label}: {p}" for p in err.problems]
    weights = path / WEIGHTS
    if not weights.is_file():
        return None, [f"{label}: no {WEIGHTS} in {path} (a .bin adapter? re-save it with PEFT's "
                      "save_pretrained(safe_serialization=True))"]
    try:
        infos = read_safetensors_header(weights)
    except InputError as err:
        return None, [f"{label}: {p}" for p in err.problems]
    problems = variant_problems(config, label)
    modules, more = _modules(config, infos, label)
    problems += more
    dtypes = {info.dtype for info in infos.values()}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    if problems:
        return None, problems
    return Adapter(path, config, modules, Checkpoint(path, infos, "safetensors"), dtype), []


def variant_problems(config: dict, label: str) -> list[str]:
    """The LoRA variants and extras an adapter uses that adapter-space merging cannot carry."""
    problems = []
    kind = config.get("peft_type", "LORA")
    if kind != "LORA":
        problems.append(f"{label}: {CONFIG}: peft_type = {kind!r}; only LoRA adapters can be merged in "
                        "adapter space")
    for key, what in UNMERGEABLE.items():
        if config.get(key) and config.get(key) != "none":
            problems.append(f"{label}: {CONFIG}: {key} is set: {what}; this cannot be merged into a "
                            "LoRA adapter. Fold it into its model (model+adapter in a mergesmith merge "
                            "recipe, or PEFT's merge_and_unload) and merge full models instead")
    if config.get("bias", "none") != "none":
        problems.append(f"{label}: {CONFIG}: bias = {config['bias']!r}: the adapter trains biases, "
                        "which a LoRA merge cannot carry; fold it into its model and merge full models")
    return problems


_FACTOR = re.compile(r"(.+)\.(lora_A|lora_embedding_A)(\.weight)?")


def _modules(config: dict, infos: dict, label: str) -> tuple[dict[str, LoraModule], list[str]]:
    problems = []
    alpha = config.get("lora_alpha", 8)
    rslora = bool(config.get("use_rslora"))
    alpha_pattern = config.get("alpha_pattern") or {}
    modules: dict[str, LoraModule] = {}
    used = set()
    for name in infos:
        match = _FACTOR.fullmatch(name)
        if not match:
            continue
        prefixed, a_kind, suffix = match.groups()
        embedding = a_kind == "lora_embedding_A"
        b_name = f"{prefixed}.{'lora_embedding_B' if embedding else 'lora_B'}{suffix or ''}"
        used.update((name, b_name))
        module = prefixed.removeprefix(PREFIX)
        if b_name not in infos:
            problems.append(f"{label}: {name} has no {b_name}; the adapter is incomplete")
            continue
        a_shape, b_shape = tuple(infos[name].shape), tuple(infos[b_name].shape)
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
            problems.append(f"{label}: {module}: factors A {list(a_shape)} and B {list(b_shape)} are not a "
                            "LoRA pair of matrices (a convolution?); only linear and embedding layers "
                            "can be merged in adapter space")
            continue
        rank = a_shape[0]
        module_alpha = pattern_value(alpha_pattern, module, alpha)
        modules[module] = LoraModule(module, name, b_name, rank, lora_scale(module_alpha, rank, rslora),
                                     embedding, (b_shape[0], a_shape[1]))
    # PEFT saves a targeted embedding's base layer whole (save_embedding_layers): a copy of the base
    # model's weight, which the base model supplies anyway; a resized vocabulary shows in its shape.
    copies = {n for n in infos if n.endswith(".base_layer.weight")}
    for name in sorted(copies):
        module = name.removeprefix(PREFIX).removesuffix(".base_layer.weight")
        found = modules.get(module)
        if found is not None and tuple(infos[name].shape) != found.weight_shape:
            problems.append(f"{label}: {WEIGHTS} saves {module}.weight as {list(infos[name].shape)}, but its "
                            f"LoRA factors change a {list(found.weight_shape)} weight (a resized vocabulary?); "
                            "adapters over a resized vocabulary cannot be merged in adapter space")
    others = sorted(set(infos) - used - copies)
    if others:
        dora = [n for n in others if "lora_magnitude_vector" in n]
        what = "DoRA magnitude vectors" if dora else "tensors that are not LoRA pairs"
        problems.append(f"{label}: {WEIGHTS} holds {what} ({len(others)}, e.g. {others[0]}); "
                        "fold the adapter into its model and merge full models instead")
    if not modules and not problems:
        problems.append(f"{label}: {WEIGHTS} holds no LoRA weights")
    return modules, problems


# ---------------------------------------------------------------- writing

@dataclass
class AdapterOutput:
    """What an adapter folder will hold: factors per module (scale 1), whole modules, and notes."""

    factors: dict[str, tuple[torch.Tensor, torch.Tensor, bool]]  # module -> (A, B, embedding)
    base_model: str
    task_type: Optional[str] = "CAUSAL_LM"
    saved: dict[str, torch.Tensor] | None = None  # modules_to_save: full tensor name -> tensor
    lora_biases: dict[str, torch.Tensor] | None = None  # module -> bias delta, as lora_B.bias
    report: dict | None = None  # written as mergesmith_report.json
    # Called with a name of ``saved`` once that tensor is written: saved tensors may be views of a
    # mapped input file, whose pages are then let go.
    release_saved: Optional[Callable[[str], None]] = None


def adapter_config(output: AdapterOutput) -> dict:
    """The ``adapter_config.json`` of ``output``: scale 1 in every module (alpha = r), the most
    common rank as ``r`` and every other module's rank in ``rank_pattern`` and ``alpha_pattern``
    (keys are full module names, which PEFT matches as a suffix of the module's name)."""
    ranks = {module: a.shape[0] for module, (a, _, _) in output.factors.items()}
    common = Counter(ranks.values()).most_common(1)[0][0] if ranks else 8
    different = {module: r for module, r in sorted(ranks.items()) if r != common}
    saved_modules = sorted({name.rsplit(".", 1)[0] for name in (output.saved or {})})
    return {
        "peft_type": "LORA",
        "task_type": output.task_type,
        "base_model_name_or_path": output.base_model,
        "r": common,
        "lora_alpha": common,
        "use_rslora": False,
        "rank_pattern": different,
        "alpha_pattern": dict(different),
        "target_modules": sorted(ranks),
        "modules_to_save": saved_modules or None,
        "lora_dropout": 0.0,
        "bias": "none",
        "lora_bias": bool(output.lora_biases),
        "fan_in_fan_out": False,
        "use_dora": False,
        "inference_mode": True,
        "init_lora_weights": True,
    }


def adapter_tensors(output: AdapterOutput) -> dict[str, torch.Tensor]:
    """Every tensor of the adapter file, by name."""
    tensors: dict[str, torch.Tensor] = {}
    for module, (a, b, embedding) in sorted(output.factors.items()):
        a_name, b_name = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
        tensors[f"{PREFIX}{module}.{a_name}"] = a
        tensors[f"{PREFIX}{module}.{b_name}"] = b
    for module, bias in sorted((output.lora_biases or {}).items()):
        tensors[f"{PREFIX}{module}.lora_B.bias"] = bias
    for name, tensor in sorted((output.saved or {}).items()):
        tensors[f"{PREFIX}{name}"] = tensor
    return tensors


def write_adapter(out_dir: Path, output: AdapterOutput, dtype: torch.dtype, overwrite: bool = False) -> Path:
    """Write the adapter folder into ``.NAME.partial-PID`` beside ``out_dir`` and rename it into
    place: no folder at ``out_dir`` ever looks finished before it is. Any failure removes it."""
    out_dir = Path(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    tensors = adapter_tensors(output)
    specs = [OutputTensor(name, dtype, tuple(t.shape)) for name, t in tensors.items()]
    try:
        remove_stale_partials(out_dir)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write_safetensors(tmp / WEIGHTS, specs, _producer(output, tensors, dtype))
        (tmp / CONFIG).write_text(json.dumps(adapter_config(output), indent=2) + "\n")
        if output.report is not None:
            (tmp / "mergesmith_report.json").write_text(json.dumps(output.report, indent=2) + "\n")
        _replace(tmp, out_dir, overwrite)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ResourceError(f"{out_dir}: writing the adapter failed: {err.strerror or err}; nothing was "
                            "written there (inputs untouched); free space, fix the permissions or choose "
                            "another output path") from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _producer(output: AdapterOutput, tensors: dict[str, torch.Tensor], dtype: torch.dtype
              ) -> Callable[[str], torch.Tensor]:
    """Each tensor in ``dtype`` when asked for; asking for the next one means the last is written,
    so a saved tensor's pages are released then (and the last one's after the loop)."""
    written: list[str] = []

    def produce(name: str) -> torch.Tensor:
        if written and output.release_saved is not None and written[-1].startswith(PREFIX):
            saved_name = written[-1].removeprefix(PREFIX)
            if saved_name in (output.saved or {}):
                output.release_saved(saved_name)
        written.append(name)
        return tensors[name].to(dtype).contiguous()

    return produce


def existing_output_problems(out_dir: Path, overwrite: bool) -> list[str]:
    """An existing output is replaced only with --overwrite; said with every other problem."""
    if Path(out_dir).exists() and not overwrite:
        return [f"{out_dir} exists; pass --overwrite to replace it"]
    return []


def _replace(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    old = None
    if out_dir.exists():
        if not overwrite:
            raise InputError(f"{out_dir} exists; pass --overwrite to replace it")
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except OSError:
        if old is not None:
            os.rename(old, out_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
