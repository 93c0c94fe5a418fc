"""The mergekit-moe YAML recipe, read as mergekit 0.1.5 reads it (pydantic), plus its own checks.

Fields and their meaning (mergekit ``mergekit/moe/config.py``, ``scripts/moe.py``):

- ``base_model``: every tensor outside the MLPs (embeddings, attention, norms, head) and the
  model the gate prompts run through;
- ``experts``: one routed expert each; its MLP becomes expert ``i`` of every layer;
- ``shared_experts``: experts every token goes through (Qwen2-MoE: exactly one);
- ``gate_mode``: how router rows are made (``docs/moe.md`` gives each formula); mergesmith adds
  ``arrow`` and ``ridge``;
- ``dtype``: the output dtype (default: the base model's ``torch_dtype``);
- ``experts_per_token``: top-k of the router (default 2);
- ``architecture``: the output architecture, matched case-insensitively by prefix against
  ``Mixtral``, ``Qwen MoE``, ``Qwen3 MoE`` (default: chosen from the inputs);
- ``shared_tensors`` (mergesmith only): merge attention, norms and embeddings from the routed
  experts with a mergesmith method instead of taking the base's (Branch-Train-Mix averages them).

Checks that need only the recipe live here (``recipe_problems``); those that need the
models' configs live in ``plan.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import warnings

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from mergesmith.errors import InputError, read_yaml_mapping

NOT_A_MAPPING = "a mergekit-moe config is a YAML mapping with base_model and experts"

PROMPT_MODES = ("hidden", "hidden_avg", "hidden_last", "cheap_embed")  # mergekit's, from the base's states
RANDOM_MODES = ("random", "uniform_random")
ROUTER_INPUT_MODES = ("arrow", "ridge")  # mergesmith's, for the router's real input (routers.py)
GATE_MODES = PROMPT_MODES + RANDOM_MODES + ROUTER_INPUT_MODES
DTYPES = ("float32", "bfloat16", "float16", "float64", "fp32", "bf16", "fp16")


def _path_of(value: Any) -> Any:
    """mergekit's ModelReference: a path string, or ``{model: {path: ...}}`` (no LoRA here)."""
    if isinstance(value, dict) and isinstance(value.get("model"), dict) and not value.get("lora"):
        return value["model"].get("path")
    if isinstance(value, str) and "+" in value:
        raise ValueError(f"{value!r} names a LoRA adapter ('+'); apply it first with mergesmith merge, "
                         "then name the merged folder")
    return value


class Expert(BaseModel):
    # mergekit ignores keys it does not know; so do we, with a warning (unknown_keys)
    model_config = ConfigDict(extra="allow")

    source_model: str
    positive_prompts: Optional[list[str]] = None
    negative_prompts: Optional[list[str]] = None
    noise_scale: Optional[float] = None
    residual_scale: Optional[float] = None

    _ref = field_validator("source_model", mode="before")(classmethod(lambda cls, v: _path_of(v)))


class MoEConfig(BaseModel):
    model_config = ConfigDict(extra="allow")

    base_model: str
    experts: list[Expert]
    gate_mode: str = "hidden"
    dtype: Optional[str] = None
    experts_per_token: int = 2
    shared_experts: Optional[list[Expert]] = None
    architecture: Optional[str] = None
    # mergesmith's extension: merge the tensors outside the MLPs from the routed experts with a
    # mergesmith method (a recipe without models; see docs/moe.md). Absent: the base's, as mergekit.
    shared_tensors: Optional[dict[str, Any]] = None

    _ref = field_validator("base_model", mode="before")(classmethod(lambda cls, v: _path_of(v)))
    # mergekit also reads "torch.bfloat16"
    _dtype = field_validator("dtype", mode="before")(
        classmethod(lambda cls, v: v.removeprefix("torch.") if isinstance(v, str) else v))

    @property
    def routed_and_shared(self) -> list[Expert]:
        return list(self.experts) + list(self.shared_experts or [])


def _location(loc: tuple) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _schema_problem(where: str, error: dict[str, Any]) -> str:
    kind = error["type"]
    if kind == "missing":
        why = "is required"
    else:
        why = error["msg"].removeprefix("Value error, ")
    return f"{where}: {_location(error['loc']) or 'config'} {why}"


def read_moe_config(source: Union[str, Path, dict, MoEConfig]) -> tuple[MoEConfig, str, str]:
    """(config, where to cite it, its YAML text) from a path, a dict or a config. InputError when it does not
    parse; ``recipe_problems`` then checks what it says."""
    if isinstance(source, MoEConfig):
        return source, "moe config", yaml.safe_dump(source.model_dump(exclude_none=True), sort_keys=False)
    if isinstance(source, dict):
        raw, where, text = source, "moe config", yaml.safe_dump(source, sort_keys=False)
    else:
        where = str(source)
        raw, text = read_yaml_mapping(source, "no such config file; give the mergekit-moe YAML", NOT_A_MAPPING)
    if not isinstance(raw, dict):
        raise InputError(f"{where}: {NOT_A_MAPPING}")
    try:
        config = MoEConfig.model_validate(raw)
    except ValidationError as err:
        raise InputError([_schema_problem(where, e) for e in err.errors()]) from None
    for key in unknown_keys(config):
        warnings.warn(f"{where}: {key} is not a mergekit-moe field and is ignored (as mergekit ignores it); "
                      "check its spelling", stacklevel=2)
    return config, where, text


def unknown_keys(config: MoEConfig) -> list[str]:
    found = [str(k) for k in config.model_extra or {}]
    for field in ("experts", "shared_experts"):
        for i, e in enumerate(getattr(config, field) or []):
            found += [f"{field}[{i}].{k}" for k in e.model_extra or {}]
    return found


def shared_tensors_recipe(config: MoEConfig) -> Optional[dict[str, Any]]:
    """The mergesmith recipe that merges the tensors outside the MLPs: the block, with the routed
    experts as ``models`` and, for a method that uses a base (task vectors), the base as
    ``base_model``, unless the block names its own. (A method that ignores bases would take the
    base as one more input.)"""
    from mergesmith.methods import BasePolicy, get_method

    if config.shared_tensors is None:
        return None
    recipe: dict[str, Any] = {"models": [{"model": e.source_model} for e in config.experts]}
    try:
        uses_base = get_method(config.shared_tensors.get("merge_method")).base != BasePolicy.IGNORED
    except (KeyError, TypeError):
        uses_base = False  # the engine names the unknown method
    if uses_base:
        recipe["base_model"] = config.base_model
    recipe.update(config.shared_tensors)
    return recipe


def needs_prompts(gate_mode: str) -> bool:
    return gate_mode in PROMPT_MODES or gate_mode == "ridge"


def _prompt_key(expert: Expert) -> tuple:
    return tuple(expert.positive_prompts or ()), tuple(expert.negative_prompts or ())


def recipe_problems(config: MoEConfig, where: str) -> list[str]:
    """Every problem the recipe alone shows (the models are checked in ``plan.py``)."""
    problems = []
    if config.gate_mode not in GATE_MODES:
        problems.append(f"{where}: gate_mode = {config.gate_mode!r} is not known; use one of {', '.join(GATE_MODES)}")
    if config.dtype is not None and config.dtype not in DTYPES:
        problems.append(f"{where}: dtype = {config.dtype!r} is not known; use bfloat16, float16 or float32")
    if not config.experts:
        problems.append(f"{where}: experts is empty; name at least two expert models")
    if config.experts_per_token < 1:
        problems.append(f"{where}: experts_per_token = {config.experts_per_token} must be at least 1")
    elif config.experts and config.experts_per_token > len(config.experts):
        problems.append(f"{where}: experts_per_token = {config.experts_per_token} is more than the "
                        f"{len(config.experts)} experts; lower it or add experts")
    groups = [("experts", config.experts), ("shared_experts", config.shared_experts or [])]
    for field, experts in groups:
        for i, e in enumerate(experts):
            for scale in ("noise_scale", "residual_scale"):
                value = getattr(e, scale)
                if value is not None and not (value == value and abs(value) != float("inf")):
                    problems.append(f"{where}: {field}[{i}].{scale} = {value} must be a finite number")
            for kind in ("positive_prompts", "negative_prompts"):
                for j, p in enumerate(getattr(e, kind) or []):
                    if not p.strip():
                        problems.append(f"{where}: {field}[{i}].{kind}[{j}] is empty; write a prompt or remove it")
    if needs_prompts(config.gate_mode):
        problems += _prompt_problems(config, where)
    return problems


def _prompt_problems(config: MoEConfig, where: str) -> list[str]:
    problems = []
    for i, e in enumerate(config.experts):
        if not e.positive_prompts:
            problems.append(f"{where}: experts[{i}] ({e.source_model}) has no positive_prompts; gate_mode "
                            f"{config.gate_mode} builds its router row from them (random, uniform_random "
                            "and arrow need none)")
    shared = config.shared_experts or []
    with_prompts = [bool(e.positive_prompts) for e in shared]
    if any(with_prompts) and not all(with_prompts):
        problems.append(f"{where}: shared_experts: give positive_prompts to every shared expert or to none")
    keys = [_prompt_key(e) for e in config.experts if e.positive_prompts]
    if len(config.experts) > 1 and len(keys) == len(config.experts) and len(set(keys)) == 1:
        problems.append(f"{where}: every expert has the same positive and negative prompts, so every router "
                        "row is the same and routing is arbitrary; give each expert prompts of its own skill")
    return problems


def identical_prompt_pairs(config: MoEConfig) -> list[tuple[int, int]]:
    """Pairs of experts (not all of them) whose prompts are identical: their router rows will be equal."""
    pairs = []
    for i, a in enumerate(config.experts):
        for j in range(i + 1, len(config.experts)):
            if a.positive_prompts and _prompt_key(a) == _prompt_key(config.experts[j]):
                pairs.append((i, j))
    return pairs
