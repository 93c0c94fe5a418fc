"""Merge PEFT LoRA adapters into one adapter: ``mergesmith merge-lora RECIPE OUT_DIR``.

The recipe is mergekit-shaped; its inputs are adapter folders over one base model::

    merge_method: ties          # concat, or any element-wise method of `mergesmith methods`
    base_model: path/to/base    # optional: checks the modules' shapes, named in the config
    models:
      - model: path/to/adapter_a
        parameters: {weight: 1.0, density: 0.5}
      - model: path/to/adapter_b
        parameters: {weight: 0.5, density: 0.5}
    parameters:
      rank: 16                  # output rank per module (default: the largest input rank)
      energy: 0.99              # or the fewest that keep this share of sum S_i^2
    out_dtype: bfloat16         # default: the adapters' own dtype

Two kinds of merge, per module (dW_i = s_i B_i A_i, s_i the adapter's own scale):

- ``concat``, exact concatenation: A = [w_1 s_1 A_1; ...], B = [B_1 ... B_n], so B A = sum_i w_i dW_i
  at rank sum_i r_i. With ``rank`` or ``energy`` it is truncated, the SVD taken from the stacked
  factors (QR of each, SVD of the small core), never of the full m x n delta.
- any registry method M (``ties``, ``task_arithmetic``, ``dare_ties``, ``linear``, ``tsv_m``, ...),
  full-delta: dW = M(0; dW_1, ..., dW_n), the method run with a zero base so its task vectors are
  the adapters' deltas (an adapter without the module contributes dW_i = 0, as its folded model
  would), then the best rank-k approximation, k from ``rank``/``energy``, by a thin SVD from the
  smaller side. The relative truncation error of every module is reported.

Everything is checked (recipe, parameters, adapter configs and headers, shapes, output path)
before any weight is read, and every problem is reported at once.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from mergesmith.checkpoint.layout import is_vocab_tensor, split_layer_name
from mergesmith.checkpoint.reader import Checkpoint, dtype_from_name
from mergesmith.errors import InputError
from mergesmith.lora.adapter import (
    Adapter,
    AdapterOutput,
    existing_output_problems,
    open_adapter,
    write_adapter,
)
from mergesmith.lora.factors import (
    OVERSAMPLE,
    choose_rank,
    concat_factors,
    core_space,
    knots_coordinates,
    randomized_svd,
    residual_error,
    split_singular_values,
    svd_of_product,
    thin_svd,
    truncation_error,
)
from mergesmith.methods import BasePolicy, MethodSpec, Param, TensorGroup, all_methods
from mergesmith.paths import OutputLock, output_problems
from mergesmith.recipe import read_recipe_raw, resolve_param

CONCAT = "concat"
RANK = Param("rank", int, None, low=1, doc="output rank of every module (default: the largest input rank)")
ENERGY = Param("energy", float, None, low=0.0, high=1.0, low_open=True,
               doc="keep the fewest singular values holding this share of sum S_i^2")
SPACE = Param("space", str, "full", choices=("full", "knots", "core"),
              doc="where the method merges: the full deltas, KnOTS coordinates or the core space")
ADAPTER_PARAMS = (RANK, ENERGY, SPACE)
CONCAT_SPEC = MethodSpec(CONCAT, fn=lambda group: group.tensors[0],
                         params=(Param("weight", float, 1.0, per_model=True, doc="the adapter's weight"),),
                         summary="exact concatenation of the LoRA factors (rank sum r_i), optionally truncated")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AdapterEntry(_Strict):
    model: str
    parameters: Optional[dict[str, Any]] = None


class LoraRecipeSpec(_Strict):
    merge_method: str
    base_model: Optional[str] = None
    models: list[AdapterEntry]
    parameters: Optional[dict[str, Any]] = None
    out_dtype: Optional[str] = None
    dtype: Optional[str] = None  # accepted for mergekit recipes; the math is always float32
    random_seed: int = 0
    name: Optional[str] = None


@dataclass
class ModulePlan:
    """One output module: the adapters that change it and the parameters resolved for it."""

    name: str
    shape: tuple[int, int]  # of B @ A
    embedding: bool
    sources: list[int]  # indices of the adapters that have it
    params: dict[str, Any]
    model_params: list[dict[str, Any]]  # per adapter, all of them
    rank: Optional[int]
    energy: Optional[float]
    space: str = "full"


@dataclass
class LoraMergePlan:
    where: str
    method: MethodSpec
    adapters: list[Adapter]
    labels: list[str]
    modules: list[ModulePlan]
    base_model: str
    out_dtype: torch.dtype
    seed: int
    task_type: Optional[str] = "CAUSAL_LM"

    @property
    def exact(self) -> bool:
        return self.method.name == CONCAT and all(m.rank is None and m.energy is None for m in self.modules)


@dataclass
class LoraMergeResult:
    out_dir: Path
    modules: int
    report: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def worst(self) -> tuple[str, float]:
        """The module with the largest relative truncation error."""
        if not self.report:
            return "", 0.0
        name = max(self.report, key=lambda m: self.report[m]["relative_error"])
        return name, self.report[name]["relative_error"]


# ---------------------------------------------------------------- planning

def adapter_methods() -> dict[str, MethodSpec]:
    """The methods a LoRA recipe may name: concat and every registry method that merges one
    tensor from the same tensor of each input, with no calibration statistics."""
    usable = {name: spec for name, spec in all_methods().items()
              if not spec.passthrough and not spec.needs_stats and not any(p.stats_file for p in spec.params)}
    return {CONCAT: CONCAT_SPEC, **usable}


def plan_lora_merge(recipe: str | Path | dict, out_dir: Optional[str | Path] = None, *,
                    overwrite: bool = False) -> LoraMergePlan:
    """Validate everything a merge needs, reading configs and headers only; raises InputError
    with every problem found."""
    raw, where = read_recipe_raw(recipe)
    try:
        spec = LoraRecipeSpec.model_validate(raw)
    except ValidationError as err:
        raise InputError([_field_problem(where, e) for e in err.errors()]) from None
    problems: list[str] = []
    methods = adapter_methods()
    method = methods.get(spec.merge_method)
    if method is None:
        why = " (it needs calibration statistics or merges layers whole)" if spec.merge_method in all_methods() else ""
        problems.append(f"{where}: merge_method = {spec.merge_method!r} cannot merge adapters{why}; "
                        f"choose one of: {', '.join(methods)}")
    if not spec.models:
        problems.append(f"{where}: models is empty; list at least one adapter folder")
    adapters, labels = [], []
    for i, entry in enumerate(spec.models):
        label = f"{where}: models[{i}].model ({entry.model})"
        adapter, found = open_adapter(Path(entry.model), label)
        problems += found
        if adapter is not None:
            adapters.append(adapter)
            labels.append(label)
    out_dtype = _out_dtype(spec, where, adapters, problems)
    # Everything below is checked even when some adapters could not be read, so that one run
    # reports every problem; the adapters that could be read stand in for all of them.
    layout = _layout(adapters, labels, problems)
    if spec.base_model is not None:
        problems += _base_problems(where, spec.base_model, layout)
    modules: list[ModulePlan] = []
    if method is not None:
        count = len(spec.models)
        if method.min_models > count or (method.max_models is not None and count > method.max_models):
            most = "" if method.max_models is None else f" and at most {method.max_models}"
            problems.append(f"{where}: {method.name} merges at least {method.min_models}{most} adapters; "
                            f"the recipe lists {count}")
        modules = _resolve_modules(where, method, spec, layout, count, problems)
    if out_dir is not None:
        inputs = {label: a.path for label, a in zip(labels, adapters)}
        if spec.base_model is not None:
            inputs[f"{where}: base_model"] = Path(spec.base_model)
        problems += output_problems(out_dir, inputs) + existing_output_problems(out_dir, overwrite)
    if problems or method is None:
        raise InputError(problems)
    base = spec.base_model or adapters[0].config.get("base_model_name_or_path") or ""
    return LoraMergePlan(where, method, adapters, labels, modules, base, out_dtype, spec.random_seed,
                         adapters[0].config.get("task_type", "CAUSAL_LM"))


def _field_problem(where: str, error: dict[str, Any]) -> str:
    loc = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in error["loc"]).replace(".[", "[")
    msg = {"missing": "is required", "extra_forbidden": "is not a field of a LoRA merge recipe; check its spelling"}
    return f"{where}: {loc or 'recipe'} {msg.get(error['type'], error['msg'])}"


def _out_dtype(spec: LoraRecipeSpec, where: str, adapters: list[Adapter], problems: list[str]) -> torch.dtype:
    if spec.out_dtype is not None:
        try:
            return dtype_from_name(spec.out_dtype)
        except (KeyError, ValueError, InputError):
            problems.append(f"{where}: out_dtype = {spec.out_dtype!r} is not a dtype; use float32, bfloat16 or float16")
            return torch.float32
    dtypes = {a.dtype for a in adapters}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def _layout(adapters: list[Adapter], labels: list[str], problems: list[str]) -> dict[str, tuple[tuple[int, int], bool, list[int]]]:
    """module -> (shape of B @ A, embedding, adapters that have it); shape disagreements are problems."""
    layout: dict[str, tuple[tuple[int, int], bool, list[int]]] = {}
    for i, adapter in enumerate(adapters):
        for name, module in adapter.modules.items():
            if name not in layout:
                layout[name] = (module.shape, module.embedding, [i])
                continue
            shape, embedding, sources = layout[name]
            if (shape, embedding) != (module.shape, module.embedding):
                first = labels[sources[0]]
                problems.append(f"{labels[i]}: {name} changes a {list(module.weight_shape)} weight, but {first} "
                                f"changes a {list((shape[1], shape[0]) if embedding else shape)} one; are "
                                "both adapters for the same base model?")
                continue
            sources.append(i)
    return dict(sorted(layout.items()))


def _base_problems(where: str, base_model: str, layout: dict) -> list[str]:
    try:
        base = Checkpoint.open(base_model)
    except InputError as err:
        return [f"{where}: base_model: {p}" for p in err.problems]
    problems = []
    for name, (shape, embedding, _) in layout.items():
        weight = base.infos.get(f"{name}.weight")
        expected = (shape[1], shape[0]) if embedding else shape
        if weight is None or tuple(weight.shape) != expected:
            found = "has no such weight" if weight is None else f"has it as {list(weight.shape)}"
            problems.append(f"{where}: base_model ({base_model}): the adapters change {name}.weight as "
                            f"{list(expected)}, but the base {found}; is it the adapters' base model?")
    base.close()
    return problems


def _resolve_modules(where: str, method: MethodSpec, spec: LoraRecipeSpec, layout: dict, n: int,
                     problems: list[str]) -> list[ModulePlan]:
    """Resolve every parameter for every module (filters and layer gradients as in a merge recipe),
    collecting each distinct problem once."""
    global_scope = dict(spec.parameters or {})
    model_scopes = [dict(entry.parameters or {}) for entry in spec.models]
    known = {p.name for p in method.params} | {p.name for p in ADAPTER_PARAMS}
    for key in global_scope:
        if key not in known:
            problems.append(f"{where}: parameters.{key} is not a parameter of {method.name} or of adapter "
                            f"merging; known: {', '.join(sorted(known))}")
    per_model = {p.name for p in method.params if p.per_model}
    for i, scope in enumerate(model_scopes):
        for key in scope:
            if key not in per_model:
                problems.append(f"{where}: models[{i}].parameters.{key} is not a per-adapter parameter of "
                                f"{method.name}; known: {', '.join(sorted(per_model)) or 'none'}")
    layers = 1 + max((split_layer_name(f"{m}.weight").index for m in layout
                      if split_layer_name(f"{m}.weight") is not None), default=0)
    seen: set[str] = set()

    def add(problem: str) -> None:
        if problem not in seen:
            seen.add(problem)
            problems.append(problem)

    modules = []
    for name, (shape, embedding, sources) in layout.items():
        layer = split_layer_name(f"{name}.weight")
        t = layer.index / max(layers - 1, 1) if layer is not None else 0.0
        tensor = f"{name}.weight"

        def value(param: Param, scopes: list[dict[str, Any]], field_name: str) -> Any:
            try:
                resolved = resolve_param(param, scopes, tensor, t)
            except KeyError:
                problem = f"{where}: {field_name} is required by {method.name}; set it"
            except (ValueError, TypeError, AttributeError) as err:
                problem = f"{where}: {field_name} {err}"
            else:
                bad = None if resolved is None else param.check(resolved)
                if bad is None:
                    return resolved
                problem = f"{where}: {field_name} = {resolved!r} {bad}"
            add(problem)
            return param.default if not param.required else None

        params = {p.name: value(p, [global_scope], f"parameters.{p.name}") for p in method.params if not p.per_model}
        model_params = [{p.name: value(p, [model_scopes[i], global_scope], f"models[{i}].parameters.{p.name}")
                         for p in method.params if p.per_model} for i in range(n)]
        rank = value(RANK, [global_scope], "parameters.rank")
        energy = value(ENERGY, [global_scope], "parameters.energy")
        space = value(SPACE, [global_scope], "parameters.space")
        if method.name == CONCAT and space != "full":
            add(f"{where}: parameters.space = {space!r}: concat merges factors, in no space; leave space out")
        if method.check_params is not None and not problems:
            for problem in method.check_params(params, model_params):
                add(f"{where}: {problem}")
        modules.append(ModulePlan(name, shape, embedding, sources, params, model_params, rank, energy, space))
    return modules


# ---------------------------------------------------------------- merging

def merge_module(plan: LoraMergePlan, module: ModulePlan, index: int = 0) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(A, B, report) of one output module, at scale 1; ``index`` seeds a stochastic method."""
    factors = [plan.adapters[i].factors(module.name) for i in module.sources]
    scales = [plan.adapters[i].modules[module.name].scale for i in module.sources]
    ranks = [a.shape[0] for a, _ in factors]
    if plan.method.name == CONCAT:
        weights = [module.model_params[i]["weight"] for i in module.sources]
        a, b = concat_factors(factors, [w * s for w, s in zip(weights, scales)])
        if module.rank is None and module.energy is None:
            return a, b, {"rank": a.shape[0], "relative_error": 0.0}
        u, s, vh = svd_of_product(b, a)
        limit = module.rank
    else:
        seed = plan.seed + index
        scaled: list[Optional[tuple[torch.Tensor, torch.Tensor]]] = [None] * len(plan.adapters)
        for i, (a, b), s in zip(module.sources, factors, scales):
            scaled[i] = (a, b.mul_(s))
        # A full-delta merge is full rank: by default, back to the largest input rank. KnOTS and
        # core-space merges have rank <= sum r_i already, kept whole unless asked otherwise.
        limit = module.rank
        if module.space == "full" and module.rank is None and module.energy is None:
            limit = max(ranks)
        if module.space == "full" and module.energy is None and 4 * (limit + OVERSAMPLE) <= min(module.shape):
            # Only the leading triplets are needed: subspace iteration, the error measured.
            delta = run_method(plan, module, [None if f is None else f[1] @ f[0] for f in scaled], seed)
            u, s, vh = randomized_svd(delta, limit, oversample=OVERSAMPLE)
            rank = choose_rank(s, rank=limit)
            a, b = split_singular_values(u, s, vh, rank)
            return a, b, {"rank": rank, "relative_error": residual_error(delta, a, b), "svd": "randomized"}
        u, s, vh = merged_svd(plan, module, scaled, seed)
    rank = choose_rank(s, rank=limit, energy=module.energy)
    a, b = split_singular_values(u, s, vh, rank)
    return a, b, {"rank": rank, "relative_error": truncation_error(s, rank)}


def merged_svd(plan: LoraMergePlan, module: ModulePlan, factors: list[Optional[tuple[torch.Tensor, torch.Tensor]]],
               seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The SVD of the merged delta, merging in the module's space (``factors[i]`` = (A_i, s_i B_i),
    None where adapter i lacks the module):

        full:   dW = M(0; dW_1, ..., dW_n)                   thin SVD of the m x n result
        knots:  dW = U M(0; C_1, ..., C_n)                   SVD of the k x n merged coordinates
        core:   dW = U_B M(0; M_1, ..., M_n) Vh_A            SVD of the small merged core

    U, U_B and Vh_A have orthonormal columns or rows, so the small SVD maps straight back.
    """
    if module.space == "knots":
        basis, coordinates = knots_coordinates(factors)
        u, s, vh = thin_svd(run_method(plan, module, coordinates, seed))
        return basis @ u, s, vh
    if module.space == "core":
        left, cores, right = core_space(factors)
        u, s, vh = thin_svd(run_method(plan, module, cores, seed))
        return left @ u, s, vh @ right
    return thin_svd(run_method(plan, module, [None if f is None else f[1] @ f[0] for f in factors], seed))


def run_method(plan: LoraMergePlan, module: ModulePlan, tensors: list[Optional[torch.Tensor]],
               seed: int) -> torch.Tensor:
    """M(0; T_1, ..., T_n): the recipe's method with a zero base, so that its task vectors are the
    T_i (None: a zero T_i, for an adapter without the module)."""
    method = plan.method
    zero = torch.zeros_like(next(t for t in tensors if t is not None))
    tensors = [zero.clone() if t is None else t for t in tensors]
    generator = torch.Generator().manual_seed(seed)
    vocab = module.embedding or is_vocab_tensor(f"{module.name}.weight")
    if method.base == BasePolicy.IGNORED:
        group = TensorGroup(module.name, tensors, module.params, module.model_params, None, generator,
                            disposable=True, vocab=vocab)
    else:
        base_params = {p.name: p.default for p in method.params if p.per_model and p.on_base and not p.required}
        group = TensorGroup(module.name, [zero, *tensors], module.params, [base_params, *module.model_params], 0,
                            generator, disposable=True, vocab=vocab)
    return method.fn(group).float()


def merge_lora(recipe: str | Path | dict, out_dir: str | Path, *, overwrite: bool = False,
               progress: bool = True) -> LoraMergeResult:
    """Plan (every check first), merge module by module, and write the adapter folder atomically."""
    start = time.perf_counter()
    out_dir = Path(out_dir)
    plan = plan_lora_merge(recipe, out_dir, overwrite=overwrite)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor, bool]] = {}
    report: dict[str, dict[str, Any]] = {}
    with OutputLock(out_dir), _closing(plan.adapters):
        for index, module in enumerate(_progress(plan.modules, progress, f"merging adapters ({plan.method.name})")):
            a, b, module_report = merge_module(plan, module, index)
            factors[module.name] = (a, b, module.embedding)
            report[module.name] = module_report
        output = AdapterOutput(factors, plan.base_model, plan.task_type, report={
            "method": plan.method.name, "exact": plan.exact, "adapters": [str(a.path) for a in plan.adapters],
            "modules": report})
        write_adapter(out_dir, output, plan.out_dtype, overwrite=overwrite)
    return LoraMergeResult(out_dir, len(factors), report, time.perf_counter() - start)


@contextmanager
def _closing(adapters: list[Adapter]):
    try:
        yield
    finally:
        for adapter in adapters:
            adapter.close()


def _progress(items: list, enabled: bool, what: str):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=what, unit="module")


def describe_errors(report: dict[str, dict[str, Any]], limit: int = 5) -> str:
    """The modules with the largest truncation errors, one line each."""
    worst = sorted(report.items(), key=lambda item: -item[1]["relative_error"])[:limit]
    return "\n".join(f"  {name}: rank {r['rank']}, relative error {r['relative_error']:.3g}" for name, r in worst
                     if r["relative_error"] > 0 or math.isnan(r["relative_error"]))
