"""Plan a mixture of experts: open every model (configs and headers only), check everything, and
lay out every output tensor with where it comes from. No weight is read here.

A plan is data: the output tensors in write order, each copied from one input tensor (with
an expert's noise and residual scale where it is an expert's), or a router row block the
gates supply.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from mergesmith.checkpoint.config import read_config
from mergesmith.checkpoint.layout import is_skipped, split_layer_name
from mergesmith.checkpoint.reader import Checkpoint, dtype_from_name, dtype_name
from mergesmith.engine import MergeOptions, MergePlan, plan_merge, resolve_model_path
from mergesmith.errors import InputError
from mergesmith.moe.arch import MIXTRAL, PROJECTIONS, OutputArch, output_config, select_arch
from mergesmith.moe.config import (RANDOM_MODES, MoEConfig, identical_prompt_pairs, needs_prompts,
                                   shared_tensors_recipe)
from mergesmith.paths import output_problems
from mergesmith.units import human_bytes

# Settings every input model must share: an expert's MLP was trained under them.
MATCHING_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size", "hidden_act",
                 "rope_theta", "rope_scaling", "rope_parameters", "tie_word_embeddings")
MLP_INPUT = "model.layers.{layer}.mlp.{proj}_proj.weight"


@dataclass
class InputModel:
    ref: str
    path: Path
    config: dict
    checkpoint: Checkpoint


@dataclass(frozen=True)
class MoETensor:
    """One output tensor: copied from ``source`` in model ``model`` (an expert's noise and, for
    ``down``, residual scale applied when ``expert`` is given), or a router block when ``router``."""
    name: str
    shape: tuple[int, ...]
    model: Optional[str] = None
    source: Optional[str] = None
    expert: Optional[int] = None  # index into config.routed_and_shared
    residual: bool = False
    router: Optional[tuple[str, int]] = None  # ("routed" | "shared", layer)
    merged: bool = False  # merged by ``MoEPlan.shared_merge`` (the config's shared_tensors) instead


@dataclass
class MoEPlan:
    config: MoEConfig
    where: str
    yaml_text: str
    arch: OutputArch
    models: dict[str, InputModel]
    out_config: dict
    out_dtype: torch.dtype
    tensors: list[MoETensor]
    layers: int
    hidden: int
    warnings: list[str] = field(default_factory=list)
    shared_merge: Any = None  # the engine's MergePlan of the tensors outside the MLPs (shared_tensors)
    merge_options: Any = None
    prompt_dtype: torch.dtype = torch.float32  # the base model's dtype in the prompt pass

    def shared_task(self, name: str) -> Any:
        """The engine's plan of tensor ``name`` in ``shared_merge``."""
        if not hasattr(self, "_shared_tasks"):
            self._shared_tasks = {t.name: t for t in self.shared_merge.tensors}
        return self._shared_tasks[name]

    @property
    def base(self) -> InputModel:
        return self.models[self.config.base_model]

    @property
    def bytes_to_write(self) -> int:
        return sum(math.prod(t.shape) for t in self.tensors) * self.out_dtype.itemsize

    def gate_pass_bytes(self) -> int:
        """What the prompt pass holds: the base model in ``prompt_dtype`` (hidden modes, ridge), plus
        the file's pages of the tensors converted while it loads; cheap_embed, its embedding (float32);
        arrow, two MLPs of one layer and their delta's Gram."""
        if self.config.gate_mode in RANDOM_MODES:
            return 0
        infos = self.base.checkpoint.infos
        mode, cfg = self.config.gate_mode, self.base.config
        if mode == "arrow":  # two MLPs, the delta and its Gram
            return (8 * cfg["intermediate_size"] + 2 * cfg["hidden_size"]) * cfg["hidden_size"] * 4
        if mode == "cheap_embed":
            return infos["model.embed_tokens.weight"].numel * 4
        kept = [i for n, i in infos.items() if not is_skipped(n)]
        model = sum(i.numel for i in kept) * self.prompt_dtype.itemsize
        # Converting while loading (a float32 file for a bfloat16 pass) reads every page of the file
        # while the converted copy is built: both are resident at the end of the load.
        model += sum(i.nbytes for i in kept if i.dtype != self.prompt_dtype)
        if mode == "ridge":  # per expert and layer, the Gram of its MLP inputs in float64
            return model + len(self.config.experts) * self.layers * self.hidden ** 2 * 8
        return model

    def predicted_peak_bytes(self) -> int:
        """The larger of the prompt pass and the write pass (a tensor in float32, its noise, its output)."""
        largest = max(math.prod(t.shape) for t in self.tensors)
        merging = self.shared_merge.predicted_peak_bytes(self.merge_options) if self.shared_merge else 0
        return max(self.gate_pass_bytes(), largest * (8 + self.out_dtype.itemsize), merging)

    def describe(self, full: bool = True) -> str:
        lines = []
        if full:
            lines.append(f"{'output tensor':64s} {'shape':>14s}  from")
            for t in self.tensors:
                src = f"router ({t.router[0]}, gate_mode {self.config.gate_mode})" if t.router else \
                    f"{t.model}:{t.source}"
                if t.merged:
                    src = f"{self.config.shared_tensors.get('merge_method')} of the experts' {t.source}"
                if t.expert is not None:
                    e = self.config.routed_and_shared[t.expert]
                    extras = [f"noise {e.noise_scale}" if e.noise_scale else "",
                              f"x{e.residual_scale}" if t.residual and e.residual_scale is not None else ""]
                    src += "".join(f" [{x}]" for x in extras if x)
                lines.append(f"{t.name:64s} {str(list(t.shape)):>14s}  {src}")
            lines.append("")
        c = self.config
        lines += [
            f"output:          {self.arch.name} ({self.arch.class_name}), {len(c.experts)} experts, "
            f"{c.experts_per_token} per token" + (f", {len(c.shared_experts)} shared" if c.shared_experts else ""),
            f"base model:      {c.base_model}",
            f"gate mode:       {c.gate_mode}",
            f"output tensors:  {len(self.tensors)}; layers: {self.layers}; dtype {dtype_name(self.out_dtype)}",
            f"bytes to write:  {human_bytes(self.bytes_to_write)}",
            f"predicted peak memory: {human_bytes(self.predicted_peak_bytes())} (the prompt pass: "
            f"{human_bytes(self.gate_pass_bytes())}; the write pass: one tensor in float32 with its noise and "
            "output; plus the runtime)",
        ]
        return "\n".join(lines)


def plan_moe(config: MoEConfig, where: str, yaml_text: str = "", out_dir: Optional[Path] = None,
             overwrite: bool = True, problems: Optional[list[str]] = None,
             merge_options: Optional[MergeOptions] = None, prompt_dtype: torch.dtype = torch.float32) -> MoEPlan:
    """Open every model named (headers and configs only) and check everything; InputError lists
    every problem at once, those passed in (the recipe's, the options') too. With ``out_dir``, an
    output that overlaps an input is refused, and an existing one unless ``overwrite``."""
    models, opening = _open_models(config, where)
    problems = list(problems or []) + opening
    if out_dir is not None:
        problems += output_problems(out_dir, {ref: m.path for ref, m in models.items()})
        if out_dir.exists() and not overwrite:
            problems.append(f"{out_dir}: already exists; choose another output directory or pass --overwrite")
    base = models.get(config.base_model)
    if base is None or len(models) < len({config.base_model, *(e.source_model for e in config.routed_and_shared)}):
        raise InputError(problems)
    problems += _matching_problems(config, models, where)
    arch, arch_problems = select_arch(config, [m.config.get("model_type", "?") for m in models.values()], where)
    problems += arch_problems
    if arch is not None:
        problems += _bias_problems(arch, base)
    problems += _tensor_problems(config, models, where)
    if needs_prompts(config.gate_mode) and not any((base.path / n).is_file() for n in ("tokenizer.json",
                                                                                      "tokenizer.model",
                                                                                      "vocab.json")):
        problems.append(f"{base.path}: no tokenizer, and gate_mode {config.gate_mode} runs the prompts through "
                        "this base model; save its tokenizer beside it")
    out_dtype = _out_dtype(config, base, where, problems)
    merge_options = merge_options or MergeOptions(progress=False)
    shared_merge = _shared_merge(config, where, merge_options, problems)
    if problems:
        raise InputError(problems)
    attention_bias = "model.layers.0.self_attn.q_proj.bias" in base.checkpoint.infos
    out_cfg = output_config(arch, base.config, len(config.experts), config.experts_per_token,
                            dtype_name(out_dtype), attention_bias)
    plan = MoEPlan(config, where, yaml_text, arch, models, out_cfg, out_dtype,
                   _layout(config, arch, base, shared_merge), base.config["num_hidden_layers"],
                   base.config["hidden_size"], shared_merge=shared_merge, merge_options=merge_options,
                   prompt_dtype=prompt_dtype)
    plan.warnings = _warnings(config, where)
    return plan


def _shared_merge(config: MoEConfig, where: str, options: MergeOptions, problems: list[str]) -> Optional[MergePlan]:
    """The engine's plan for the shared_tensors block, its problems added to ``problems``."""
    recipe = shared_tensors_recipe(config)
    if recipe is None:
        return None
    try:
        return plan_merge(recipe, options)
    except InputError as err:
        problems += [f"{where}: shared_tensors: {p.removeprefix('recipe: ')}" for p in err.problems]
        return None


def _open_models(config: MoEConfig, where: str) -> tuple[dict[str, InputModel], list[str]]:
    fields = [("base_model", config.base_model)]
    fields += [(f"experts[{i}].source_model", e.source_model) for i, e in enumerate(config.experts)]
    fields += [(f"shared_experts[{i}].source_model", e.source_model) for i, e in enumerate(config.shared_experts or [])]
    models: dict[str, InputModel] = {}
    problems: list[str] = []
    for field_name, ref in fields:
        if ref in models:
            continue
        try:
            path = resolve_model_path(ref)
            models[ref] = InputModel(ref, path, read_config(path / "config.json"), Checkpoint.open(path))
        except InputError as err:
            problems += [f"{where}: {field_name}: {p}" for p in err.problems]
    return models, problems


def _matching_problems(config: MoEConfig, models: dict[str, InputModel], where: str) -> list[str]:
    base = models[config.base_model].config
    problems = []
    for ref, m in models.items():
        for key in MATCHING_KEYS:
            if m.config.get(key) != base.get(key):
                problems.append(f"{where}: {ref}: {key} = {m.config.get(key)!r}, but the base model has "
                                f"{base.get(key)!r}; every expert must be a fine-tune of the base's family")
    return problems


def _bias_problems(arch: OutputArch, base: InputModel) -> list[str]:
    names = base.checkpoint.infos
    problems = []
    if any(".mlp." in n and n.endswith(".bias") for n in names):
        problems.append(f"{base.path}: its MLPs have biases (mlp_bias), which {arch.name} experts cannot hold")
    if "model.layers.0.self_attn.o_proj.bias" in names or (arch is MIXTRAL and "model.layers.0.self_attn.q_proj.bias" in names):
        problems.append(f"{base.path}: its attention has biases (attention_bias), which {arch.name} cannot hold; "
                        "choose another architecture")
    return problems


def _tensor_problems(config: MoEConfig, models: dict[str, InputModel], where: str) -> list[str]:
    """Every MLP matrix an expert gives, present with its shape; the base's embedding (and head, untied)."""
    base = models[config.base_model]
    layers, hidden, inter = (base.config.get(k) for k in ("num_hidden_layers", "hidden_size", "intermediate_size"))
    problems = []
    shapes = {p: mlp_shape(base.config, p) for p in PROJECTIONS}
    arrow = config.gate_mode == "arrow"  # reads the base's MLPs and norms too
    for ref in dict.fromkeys(([base.ref] if arrow else []) + [e.source_model for e in config.routed_and_shared]):
        infos = models[ref].checkpoint.infos
        bad = [MLP_INPUT.format(layer=layer, proj=p) for layer in range(layers) for p in PROJECTIONS
               if MLP_INPUT.format(layer=layer, proj=p) not in infos
               or infos[MLP_INPUT.format(layer=layer, proj=p)].shape != shapes[p]]
        if bad:
            problems.append(f"{where}: {ref}: {len(bad)} MLP tensors missing or of the wrong shape (e.g. {bad[0]}; "
                            f"expected gate/up {list(shapes['gate'])}, down {list(shapes['down'])})")
    needed = ["model.embed_tokens.weight"] + ([] if base.config.get("tie_word_embeddings") else ["lm_head.weight"])
    needed += [f"model.layers.{i}.post_attention_layernorm.weight" for i in range(layers or 0) if arrow]
    problems += [f"{where}: {base.ref}: has no {n}" + ("; if it ties its embeddings, say tie_word_embeddings: true "
                                                       "in its config.json" if "lm_head" in n else "")
                 for n in needed if n not in base.checkpoint.infos]
    return problems


def _out_dtype(config: MoEConfig, base: InputModel, where: str, problems: list[str]) -> torch.dtype:
    name = config.dtype or base.config.get("dtype") or base.config.get("torch_dtype") or "float32"
    try:
        return dtype_from_name(name)
    except ValueError:
        problems.append(f"{where}: {base.ref}: config dtype {name!r} is not float32, bfloat16 or float16; "
                        "set dtype in the moe config")
        return torch.float32


def _layout(config: MoEConfig, arch: OutputArch, base: InputModel, shared_merge: Optional[MergePlan]) -> list[MoETensor]:
    """Every output tensor in write order: the base's non-MLP tensors (or their merge), then each
    layer's router and experts."""
    infos = base.checkpoint.infos
    layers, hidden = base.config["num_hidden_layers"], base.config["hidden_size"]
    merged = {t.name for t in shared_merge.tensors} if shared_merge is not None else set()
    tensors = [MoETensor(n, info.shape, base.ref, n, merged=n in merged) for n, info in infos.items()
               if not is_skipped(n) and ".mlp." not in n]
    tensors.sort(key=lambda t: (split_layer_name(t.name) is not None,
                                split_layer_name(t.name).index if split_layer_name(t.name) else 0))
    n_routed = len(config.experts)
    for layer in range(layers):
        tensors.append(MoETensor(arch.router_name(layer), (n_routed, hidden), router=("routed", layer)))
        for i, expert in enumerate(config.routed_and_shared):
            for proj in PROJECTIONS:
                source = MLP_INPUT.format(layer=layer, proj=proj)
                name = arch.expert_name(layer, i, proj) if i < n_routed else arch.shared_expert_name(layer, proj)
                tensors.append(MoETensor(name, mlp_shape(base.config, proj), expert.source_model, source, i,
                                         residual=proj == "down"))
        if config.shared_experts:
            tensors.append(MoETensor(arch.shared_gate_name(layer), (1, hidden), router=("shared", layer)))
    return tensors


def mlp_shape(config: dict, proj: str) -> tuple[int, int]:
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    return (hidden, inter) if proj == "down" else (inter, hidden)


def _warnings(config: MoEConfig, where: str) -> list[str]:
    found = []
    n = len(config.experts)
    if n & (n - 1):
        found.append(f"{where}: {n} experts is not a power of two; llama.cpp cannot load such a model")
    for i, j in identical_prompt_pairs(config) if needs_prompts(config.gate_mode) else []:
        if len(config.experts) > 2:
            found.append(f"{where}: experts[{i}] and experts[{j}] have identical prompts, so identical router "
                         "rows: they will split their tokens at random")
    if len(config.experts) > 1 and len({e.source_model for e in config.experts}) == 1:
        found.append(f"{where}: every expert is the same model; the output computes what that model does, "
                     "at more cost (useful only as a start for training)")
    for w in found:
        warnings.warn(w, stacklevel=3)
    return found
