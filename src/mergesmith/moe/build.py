"""Build a mixture of experts: plan (no weights read), gates (the prompt pass), then stream every
output tensor into shards that the writer finishes atomically."""

from __future__ import annotations

import dataclasses
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch

from mergesmith.checks import choice_problems, device_problems, resolve_device
from mergesmith.checkpoint.writer import CheckpointWriter, OutputTensor, remove_stale_partials
from mergesmith.engine import MergeOptions, merge_tensor
from mergesmith.errors import InputError
from mergesmith.moe.config import ROUTER_INPUT_MODES, MoEConfig, read_moe_config, recipe_problems
from mergesmith.moe.gates import compute_gates, degenerate_layers, tokenize_like_mergekit
from mergesmith.moe.plan import MoEPlan, MoETensor, plan_moe
from mergesmith.moe.routers import arrow_gates, ridge_gates
from mergesmith.engine.side_files import TOKENIZER_FILES
from mergesmith.paths import OutputLock

# The base's tokenizer files as merge copies them, and its generation settings (an MoE keeps the base's).
COPIED_FILES = (*TOKENIZER_FILES, "generation_config.json")
RECIPE_NAME = "mergesmith_moe.yml"
PROMPT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class MoEOptions:
    device: str = "cpu"  # where the prompt pass runs: cpu, cuda, cuda:N or auto
    out_shard_size: int = 5 * 10 ** 9
    overwrite: bool = False
    progress: bool = True
    random_seed: int = 0  # random gates and expert noise
    prompt_dtype: str = "bfloat16"  # the base's dtype in the prompt pass, as mergekit-moe's (float32: twice the memory)


@dataclass
class MoEResult:
    out_dir: Optional[Path]
    plan: MoEPlan
    gates: Optional[torch.Tensor] = None  # (layers, routed + shared experts, hidden), float32
    seconds: float = 0.0


def option_problems(options: MoEOptions) -> list[str]:
    problems = device_problems(options.device) + choice_problems("--prompt-dtype", options.prompt_dtype, PROMPT_DTYPES)
    if options.out_shard_size < 1:
        problems.append(f"--out-shard-size {options.out_shard_size} must be at least one byte, e.g. 5GB")
    return problems


def build_moe(config: Union[str, Path, dict, MoEConfig], out_dir: Union[str, Path], *, dry_run: bool = False,
              options: Optional[MoEOptions] = None, **kwargs) -> MoEResult:
    """Build the mixture of experts a mergekit-moe config describes into ``out_dir``.

    Every problem with the config, the models and the output is raised together as one
    ``InputError`` before any weight is read. With ``dry_run`` only the plan is made.
    """
    # A copy: the caller's options stay as they were (replace also rejects unknown names).
    options = dataclasses.replace(options or MoEOptions(), **kwargs)
    out_dir = Path(out_dir)
    parsed, where, text = read_moe_config(config)
    plan = plan_moe(parsed, where, text, out_dir, overwrite=options.overwrite or dry_run,
                    problems=option_problems(options) + recipe_problems(parsed, where),
                    # a bad --device is reported once, by option_problems, not again by the engine
                    merge_options=MergeOptions(device="cpu" if device_problems(options.device) else options.device,
                                               progress=False),
                    prompt_dtype=PROMPT_DTYPES.get(options.prompt_dtype, torch.float32))
    if dry_run:
        close_inputs(plan)
        return MoEResult(None, plan)
    try:
        with OutputLock(out_dir):
            remove_stale_partials(out_dir)
            if out_dir.exists() and not options.overwrite:  # another run may have finished meanwhile
                raise InputError(f"{out_dir}: already exists; choose another output directory or pass --overwrite")
            start = time.perf_counter()
            gates = plan_gates(plan, options)
            write_moe(plan, gates, out_dir, options)
            return MoEResult(out_dir, plan, gates, time.perf_counter() - start)
    finally:
        close_inputs(plan)


def close_inputs(plan: MoEPlan) -> None:
    """Forget every mapped input file (the shared-tensor merge's too)."""
    for m in plan.models.values():
        m.checkpoint.close()
    for m in plan.shared_merge.models if plan.shared_merge is not None else []:
        m.checkpoint.close()


def plan_gates(plan: MoEPlan, options: MoEOptions) -> torch.Tensor:
    """Router rows of every routed and shared expert: (layers, experts, hidden), float32."""
    base, mode, device = plan.base, plan.config.gate_mode, resolve_device(options.device)
    if mode in ROUTER_INPUT_MODES:
        gates = router_input_gates(plan, device, options.progress)
    else:
        embed = base.checkpoint.read("model.embed_tokens.weight") if mode == "cheap_embed" else None
        gates = compute_gates(mode, plan.config.routed_and_shared, plan.layers, plan.hidden, base_path=base.path,
                              embed=embed, device=device, seed=options.random_seed, progress=options.progress,
                              dtype=plan.prompt_dtype)
    bad = degenerate_layers(gates) if mode not in ROUTER_INPUT_MODES else []  # their rows are not unit vectors
    if bad:
        warnings.warn(f"{plan.where}: the router rows of {len(bad)} of {plan.layers} layers are nearly dependent "
                      f"(condition number above 5, e.g. layer {bad[0]}); the prompts may be too alike, and some "
                      "experts will rarely be chosen", stacklevel=2)
    return gates


def router_input_gates(plan: MoEPlan, device: str, progress: bool) -> torch.Tensor:
    """``arrow`` or ``ridge`` rows for the routed experts; a shared expert's row is zero (routers.py)."""
    from transformers.activations import ACT2FN

    def read(ref: str, name: str) -> torch.Tensor:
        checkpoint = plan.models[ref].checkpoint
        tensor = checkpoint.read(name).to(torch.float32, copy=True)
        checkpoint.release(name)
        return tensor

    refs = [e.source_model for e in plan.config.experts]
    if plan.config.gate_mode == "arrow":
        gates = arrow_gates(read, plan.config.base_model, refs, plan.layers,
                            ACT2FN[plan.base.config.get("hidden_act", "silu")], progress)
    else:
        gates = ridge_gates(read, plan.base.path, refs, [e.positive_prompts for e in plan.config.experts],
                            plan.layers, device, tokenize_like_mergekit, progress, plan.prompt_dtype)
    shared = torch.zeros(plan.layers, len(plan.config.shared_experts or []), plan.hidden)
    return torch.cat([gates, shared], dim=1)


def produce(plan: MoEPlan, t: MoETensor, gates: torch.Tensor, seed: int, position: int) -> torch.Tensor:
    """One output tensor in the output dtype: a router block, or an input tensor with its expert's
    noise (seeded per tensor, so any order gives the same bytes) and residual scale."""
    n_routed = len(plan.config.experts)
    if t.router is not None:
        kind, layer = t.router
        rows = gates[layer, :n_routed] if kind == "routed" else gates[layer, n_routed:n_routed + 1]
        return rows.to(plan.out_dtype).contiguous()
    if t.merged:
        return merge_tensor(plan.shared_merge, plan.shared_task(t.source),
                            resolve_device(plan.merge_options.device)).to(plan.out_dtype)
    checkpoint = plan.models[t.model].checkpoint
    tensor = checkpoint.read(t.source)
    expert = plan.config.routed_and_shared[t.expert] if t.expert is not None else None
    residual_scale = expert.residual_scale if expert is not None and t.residual else None
    if expert is not None and (expert.noise_scale is not None or residual_scale is not None):
        tensor = expert_tensor(tensor, expert.noise_scale, residual_scale,
                               torch.Generator().manual_seed(seed * 1_000_003 + position))
    # In the stored dtype this is a view of the mapped file: the caller releases its pages once
    # the tensor is written (``write_moe``), not before, or the writer would fault them in again
    # and they would stay resident.
    return tensor.to(plan.out_dtype).contiguous()


def expert_tensor(tensor: torch.Tensor, noise_scale: Optional[float], residual_scale: Optional[float],
                  generator: torch.Generator) -> torch.Tensor:
    """W + noise_scale * N(0, 1), times residual_scale (down projections only), in float32."""
    out = tensor.float()
    if noise_scale is not None:
        out = out + noise_scale * torch.randn(out.shape, generator=generator)
    if residual_scale is not None:
        out = out * residual_scale
    return out


def write_moe(plan: MoEPlan, gates: torch.Tensor, out_dir: Path, options: MoEOptions) -> Path:
    from tqdm.auto import tqdm

    specs = [OutputTensor(t.name, plan.out_dtype, tuple(t.shape)) for t in plan.tensors]
    with CheckpointWriter(out_dir, specs, options.out_shard_size, overwrite=options.overwrite) as writer:
        for position, t in enumerate(tqdm(plan.tensors, desc="moe tensors", unit="tensor",
                                          disable=not options.progress)):
            writer.write(t.name, produce(plan, t, gates, options.random_seed, position))
            if t.router is None and not t.merged:
                plan.models[t.model].checkpoint.release(t.source)
        writer.write_file("config.json", json.dumps(plan.out_config, indent=2, sort_keys=True) + "\n")
        for name in COPIED_FILES:
            if (plan.base.path / name).is_file():
                writer.copy_file(plan.base.path / name)
        writer.write_file(RECIPE_NAME, plan.yaml_text)
        writer.write_file("README.md", model_card(plan))
        return writer.commit()


def model_card(plan: MoEPlan) -> str:
    from mergesmith._version import __version__

    c = plan.config
    experts = "\n".join(f"{i}. `{e.source_model}`" for i, e in enumerate(c.experts))
    shared = "".join(f"\nShared expert: `{e.source_model}`\n" for e in c.shared_experts or [])
    return (f"---\nlibrary_name: transformers\ntags:\n- mergesmith\n- moe\n---\n# Mixture of experts\n\n"
            f"Built with [mergesmith](https://pypi.org/project/mergesmith/) {__version__} `moe`: a "
            f"{plan.arch.class_name} of {len(c.experts)} experts, {c.experts_per_token} per token, routers from "
            f"gate_mode `{c.gate_mode}`, everything outside the MLPs from `{c.base_model}`"
            + (f" merged by `{c.shared_tensors.get('merge_method')}`" if c.shared_tensors else "") + ".\n\n"
            f"## Experts\n\n{experts}\n{shared}\n## Config\n\n```yaml\n{plan.yaml_text}```\n")
