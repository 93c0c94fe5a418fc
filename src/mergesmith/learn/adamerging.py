"""AdaMerging: task-vector coefficients learned by minimizing prediction entropy on unlabeled prompts.

Yang et al., "AdaMerging: Adaptive Model Merging for Multi-Task Learning", ICLR 2024,
https://arxiv.org/abs/2310.02575. We follow FusionBench 0.2.33 (``fusion_bench/method/adamerging/``,
``layer_wise_adamerging.py`` with its ``clip.yaml`` defaults, which are the paper's): Adam with
lr 1e-3 on the coefficients, every coefficient starting at 0.3, no clamping, and at each step one
shuffled batch of every task, the task losses summed before the step.

The merged model is a function of the coefficients λ (a T x G matrix, T models besides the base):

    θ_p(λ) = θ_0,p + Σ_t λ_{t,g(p)} τ_{t,p},        τ_t = θ_t − θ_0

``g(p)`` is the coefficient column of tensor p: 0 for every tensor (``granularity="task"``), or the
index of p's decoder layer, with one more shared column L for the tensors outside the layers
(embeddings, final norm, lm_head) (``granularity="layer"``). The paper's "layer-wise" has one
coefficient per parameter tensor; ours is one per decoder block, the granularity a mergekit
gradient can express (docs/learn.md, deviations).

AdaMerging++ (``prune=True``) uses the TIES-trimmed task vectors τ'_t (top ``density`` of |τ_t|) and
only the entries that agree with the elected sign:

    θ_p(λ) = θ_0,p + Σ_{t: sgn(λ_t τ'_t,p) = γ_p} λ_t τ'_t,p,     γ_p = sgn(Σ_t λ_t τ'_t,p)  (0 -> +)

which is exactly what a ``ties`` recipe with weights λ, ``normalize: false`` and ``lambda: 1``
computes (mergekit and mergesmith weight before they elect). The paper elects once from the
unweighted sum; the two agree while the coefficients of a tensor are equal (at the start) and
differ only where learned coefficients flip a close vote. The election is piecewise constant, so
its gradient is zero and λ's gradient flows through the kept entries.

Objective, over prompts only (answers are never read): for each task the mean entropy of

- multiple choice: p = softmax over the choices of their log-likelihoods, each the sum of its
  tokens' log-probabilities given the context (``evaluate.scoring.choice_loglikelihoods``), the
  distribution the harness's ``acc`` takes the argmax of;
- generation: the model's next-token distribution at the prompt's last position, the first token
  greedy decoding would emit.

``H(p) = -Σ_i p_i log p_i``, computed as ``-Σ softmax(x) * log_softmax(x)`` (FusionBench adds 1e-8
inside the log; we need no such guard).

Prompts are rendered and tokenized by the evaluation harness (``render_context``, ``encode_mc``,
``encode_gen``), the model is the harness's ``LoadedModel`` run with the merged tensors through
``torch.func.functional_call``, and the task vectors are read through the merge engine's plan of
the input recipe, so that θ_0 and τ_t are the very float32 tensors ``mergesmith merge`` will read.

Memory: θ_0 (the loaded base model) and the T task vectors stay in memory in float32, plus per
step the merged tensors and their gradient (2 more model copies) and the activations of one batch;
see docs/learn.md.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
import yaml
from tqdm.auto import tqdm

from mergesmith.checkpoint.config import runnable_problems
from mergesmith.checkpoint.lora import split_lora_ref
from mergesmith.checks import at_least, choice_problems, device_problems, resolve_device
from mergesmith.errors import InputError
from mergesmith.paths import output_problems
from mergesmith.recipe import Recipe, load_recipe, model_refs_of, read_recipe_raw

GRANULARITIES = ("layer", "task")
METHODS = ("task_arithmetic", "ties")
PathLike = Union[str, Path]


@dataclass
class AdaMergingSettings:
    granularity: str = "layer"  # "layer": one coefficient per model and decoder layer (+1 outside); "task"
    prune: bool = False  # AdaMerging++: TIES-trimmed, sign-elected task vectors; writes a ties recipe
    steps: int = 1000  # FusionBench's max_steps
    lr: float = 1e-3
    init: float = 0.3
    batch_size: int = 16  # prompts per task per step
    samples: Optional[int] = None  # prompts kept per task (seeded draw); None: all
    seed: int = 0
    device: str = "cpu"
    progress: bool = True


@dataclass
class TaskVectors:
    """θ_0 and the task vectors of every merged tensor, with each tensor's coefficient column."""

    names: list[str]  # the model's parameter names, in plan order
    base: list[torch.Tensor]  # θ_0 (the loaded base model's own parameters)
    vectors: list[torch.Tensor]  # (T, *shape): τ_t, or TIES-trimmed τ'_t with ``elect``
    columns: list[int]  # g(p)
    models: list[str]  # the T models besides the base, in recipe order
    fields: list[str]  # where each sits in the recipe ("models[2]")
    layers: int  # L, decoder layers
    outside: list[str]  # tensors outside the layers (their recipe names), column L
    elect: bool


@dataclass
class AdaMergingResult:
    lambdas: torch.Tensor  # (T, G)
    recipe: dict[str, Any]  # the learned recipe
    losses: list[float]  # the summed task losses of every step (before its update)
    objective_before: float  # Σ_tasks mean entropy over all selected prompts, at λ = init
    objective_after: float  # the same at the learned λ
    vectors: TaskVectors
    lm: Any = field(repr=False, default=None)  # the LoadedModel (base weights), for merged_parameters


# ----------------------------------------------------------------------------- the objective


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """H(softmax(x)) = -Σ_i p_i log p_i along the last axis, in float32 (one value per row)."""
    logits = logits.float()
    return -(torch.softmax(logits, dim=-1) * torch.log_softmax(logits, dim=-1)).sum(-1)


def batch_entropies(lm: Any, units: list[Any], parameters: Optional[dict[str, torch.Tensor]] = None
                    ) -> torch.Tensor:
    """The entropy of each prompt of ``units`` (MCRequest or GenRequest) under the model run with
    ``parameters``: over the choices' log-likelihoods, or over the next token (module docstring)."""
    from mergesmith.evaluate.generation import GenRequest
    from mergesmith.evaluate.scoring import choice_loglikelihoods, full_inputs, left_padded

    out = []
    choice_items = [u for u in units if not isinstance(u, GenRequest)]
    prompts = [u for u in units if isinstance(u, GenRequest)]
    if choice_items:
        logits = lm.forward(*full_inputs(lm, choice_items), parameters=parameters).logits
        loglik = choice_loglikelihoods(logits, choice_items)
        start = 0
        for request in choice_items:
            n = len(request.continuations)
            out.append(entropy(loglik[start:start + n]).reshape(1))
            start += n
    if prompts:
        ids, mask, positions = left_padded(lm, [p.prompt for p in prompts])
        logits = lm.forward(ids, mask, positions, last_only=True, parameters=parameters).logits
        out.append(entropy(logits[:, -1]))
    return torch.cat(out)


@dataclass
class PromptTask:
    """One task's encoded prompts and the seeded, endlessly reshuffled order they are drawn in."""

    name: str
    units: list[Any]
    seed: int
    batch_size: int
    _order: list[int] = field(default_factory=list)
    _epoch: int = 0

    def next_batch(self) -> list[Any]:
        """The next ``batch_size`` prompts; a new permutation each pass (a shuffled loader's order)."""
        batch = []
        while len(batch) < min(self.batch_size, len(self.units)):
            if not self._order:
                self._order = list(range(len(self.units)))
                random.Random(f"{self.seed}:{self.name}:{self._epoch}").shuffle(self._order)
                self._epoch += 1
            batch.append(self.units[self._order.pop()])
        return batch


def encode_prompts(lm: Any, files: list[str], settings: AdaMergingSettings) -> list[PromptTask]:
    """Every task of ``files`` as the harness renders and tokenizes it (answers unused), ``samples``
    of each drawn with the seed."""
    from mergesmith.evaluate.generation import encode_gen
    from mergesmith.evaluate.prompts import render_context
    from mergesmith.evaluate.scoring import encode_mc
    from mergesmith.evaluate.tasks import MULTIPLE_CHOICE, load_tasks

    out = []
    for task in load_tasks(files):
        items = list(task.items)
        if settings.samples is not None and len(items) > settings.samples:
            keep = sorted(random.Random(f"{settings.seed}:{task.name}").sample(range(len(items)), settings.samples))
            items = [items[i] for i in keep]
        if not items:
            continue
        contexts = [render_context(task, item, lm.tokenizer) for item in items]
        if task.type == MULTIPLE_CHOICE:
            units = encode_mc(lm, task, items, contexts)
        else:
            # One token is predicted, none generated: the prompt may fill the window less one.
            one_token = replace(task, settings=replace(task.settings, max_new_tokens=1))
            units = encode_gen(lm, one_token, items, contexts)
        out.append(PromptTask(task.name, units, settings.seed, settings.batch_size))
    if not out:
        raise InputError(f"--tasks {' '.join(files)}: no prompts found; give task files with at least one item")
    return out


def objective(lm: Any, tasks: list[PromptTask], parameters: dict[str, torch.Tensor], batch_size: int) -> float:
    """Σ_tasks (mean entropy over all of the task's prompts), without gradients."""
    total = 0.0
    with torch.no_grad():
        for task in tasks:
            values = [batch_entropies(lm, task.units[i:i + batch_size], parameters)
                      for i in range(0, len(task.units), batch_size)]
            total += float(torch.cat(values).mean())
    return total


# ----------------------------------------------------------------------------- the merged model


def merged_tensor(base: torch.Tensor, vectors: torch.Tensor, lambdas: torch.Tensor, elect: bool) -> torch.Tensor:
    """θ_0 + Σ_t λ_t τ_t (with ``elect``, only the terms that agree with sgn Σ_t λ_t τ_t).

    Summed model by model in recipe order, as the engine's task_arithmetic and ties do, so that the
    written recipe gives the same float32 values (up to the engine's fused multiply-add).
    """
    terms = [lam * tau for lam, tau in zip(lambdas, vectors)]
    if elect:
        with torch.no_grad():
            vote = terms[0].clone()
            for term in terms[1:]:
                vote.add_(term)
            sign = torch.where(vote >= 0, 1.0, -1.0).to(base.dtype)
        terms = [term * (term * sign > 0) for term in terms]
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total + base


def merged_parameters(vectors: TaskVectors, lambdas: torch.Tensor) -> dict[str, torch.Tensor]:
    """θ(λ) for every merged tensor, by model parameter name; differentiable in ``lambdas`` (T, G)."""
    return {name: merged_tensor(base, tau, lambdas[:, column], vectors.elect)
            for name, base, tau, column in zip(vectors.names, vectors.base, vectors.vectors, vectors.columns)}


def load_task_vectors(plan: Any, lm: Any, settings: AdaMergingSettings) -> TaskVectors:
    """Read every tensor of ``plan`` (the input recipe's merge plan) as the engine reads it, form the
    task vectors (TIES-trimmed with ``prune``), and make the loaded base model's parameters θ_0."""
    from mergesmith.checkpoint.layout import split_layer_name
    from mergesmith.engine.tensor import load_inputs
    from mergesmith.methods.sparsify import trim_by_magnitude

    recipe: Recipe = plan.recipe
    sources = recipe.slices[0].sources
    others = [s for s in sources if s.model != recipe.base_model]
    own = dict(lm.model.named_parameters(remove_duplicate=False))
    seen: dict[int, str] = {}
    layers = plan.models[plan.reference].layers
    names, bases, vectors, columns, outside = [], [], [], [], []
    if settings.prune and all(mp.get("density", 1.0) >= 1 for t in plan.tensors for mp in t.model_params):
        warnings.warn(f"{recipe.source_name}: --prune with density 1 trims nothing (only the sign election "
                      "remains); AdaMerging++ keeps the top 20%: set parameters.density: 0.2", stacklevel=2)
    for task in tqdm(plan.tensors, desc="task vectors", disable=not settings.progress):
        first = plan.models[task.inputs[0].model].checkpoint.infos[task.inputs[0].name]
        if not first.dtype.is_floating_point:
            continue
        param = own.get(task.name)
        if param is None:
            raise InputError(f"{recipe.source_name}: tensor {task.name} of the checkpoint is not a parameter of the "
                             f"model transformers builds from {recipe.base_model}; adamerge needs the two to agree")
        if id(param) in seen:  # tied to a tensor already merged (tie_weights keeps them equal)
            continue
        seen[id(param)] = task.name
        tensors, _ = load_inputs(plan, task, lm.device)
        base = tensors[task.base_index]
        taus = []
        for k, x in enumerate(tensors):
            if k == task.base_index:
                continue
            tau = x.sub_(base)
            if settings.prune:
                mp = task.model_params[k]
                trim_by_magnitude(tau, mp["density"], rescale=task.params.get("rescale", False), inplace=True)
            taus.append(tau)
        with torch.no_grad():
            param.copy_(base)  # θ_0 exactly as the engine reads it; one copy only
        param.requires_grad_(False)
        layer = split_layer_name(task.name)
        names.append(task.name)
        bases.append(param)
        vectors.append(torch.stack(taus))
        del taus, tensors
        if settings.granularity == "task":
            columns.append(0)
        elif layer is None:
            columns.append(layers)
            outside.append(task.name)
        else:
            columns.append(layer.index)
    for p in own.values():
        p.requires_grad_(False)
    return TaskVectors(names, bases, vectors, columns, [s.model for s in others], [s.field for s in others],
                       layers, outside, settings.prune)


# ----------------------------------------------------------------------------- learning


def learn(vectors: TaskVectors, lm: Any, tasks: list[PromptTask], settings: AdaMergingSettings,
          should_stop: Optional[Callable[[], bool]] = None) -> tuple[torch.Tensor, list[float]]:
    """Adam on λ (T x G, every entry ``init``) for ``steps`` steps; returns λ and each step's loss.

    Each step merges once, backpropagates every task's batch loss to the merged tensors (so one
    task's activations are held at a time), then carries the summed gradient through the merge to λ.
    ``should_stop`` is asked before every step (a time budget): when it says so, the λ learned so far
    is returned, with fewer losses than ``steps``.
    """
    columns = (vectors.layers + 1) if settings.granularity == "layer" else 1
    lambdas = torch.full((len(vectors.models), columns), float(settings.init), dtype=torch.float32,
                         device=lm.device, requires_grad=True)
    optimizer = torch.optim.Adam([lambdas], lr=settings.lr)
    losses = []
    bar = tqdm(range(settings.steps), desc="adamerge", disable=not settings.progress)
    for _ in bar:
        if should_stop is not None and should_stop():
            break
        optimizer.zero_grad()
        merged = merged_parameters(vectors, lambdas)
        leaves = {name: t.detach().requires_grad_(True) for name, t in merged.items()}
        total = 0.0
        for task in tasks:
            loss = batch_entropies(lm, task.next_batch(), leaves).mean()
            loss.backward()
            total += float(loss.detach())
        names = [n for n in merged if leaves[n].grad is not None]
        torch.autograd.backward([merged[n] for n in names], [leaves[n].grad for n in names])
        optimizer.step()
        losses.append(total)
        bar.set_postfix(loss=f"{total:.4f}")
    bar.close()
    return lambdas.detach(), losses


# ----------------------------------------------------------------------------- the written recipe


def _value(x: torch.Tensor) -> float:
    return float(x)  # float32 -> the exact float64, which YAML writes and reads back unchanged


def weight_setting(vectors: TaskVectors, row: torch.Tensor, granularity: str) -> Any:
    """One model's learned ``weight``: a number (task-wise), or filters for the tensors outside the
    layers followed by a gradient whose i-th of L values lands on layer i (t = i/(L-1))."""
    if granularity == "task":
        return _value(row[0])
    gradient = [_value(x) for x in row[:vectors.layers]]
    if not vectors.outside:
        return gradient
    return [{"filter": name, "value": _value(row[vectors.layers])} for name in vectors.outside] + [{"value": gradient}]


def learned_recipe(raw: dict[str, Any], vectors: TaskVectors, lambdas: torch.Tensor,
                   settings: AdaMergingSettings) -> dict[str, Any]:
    """The input recipe with the learned weights: ``task_arithmetic`` (``ties`` with ``prune``),
    ``lambda: 1``, ``normalize: false``, computed in float32; the rest as the input gave it."""
    out = copy.deepcopy(raw)
    out["merge_method"] = "ties" if settings.prune else "task_arithmetic"
    out.pop("calibration", None)
    params = dict(out.get("parameters") or {})
    params.pop("weight", None)
    params.update({"lambda": 1.0, "normalize": False})
    out["parameters"] = params
    out_dtype = raw.get("out_dtype") or raw.get("dtype")
    out["dtype"] = "float32"  # the precision λ was learned in
    if out_dtype and out_dtype not in ("float32", "fp32"):
        out["out_dtype"] = out_dtype
    entries = out["models"]
    for entry in entries:
        entry.pop("calibration", None)
    for t, field_name in enumerate(vectors.fields):
        entry = entries[int(field_name[len("models["):-1])]
        own = dict(entry.get("parameters") or {})
        own["weight"] = weight_setting(vectors, lambdas[t], settings.granularity)
        entry["parameters"] = own
    return out


def check_recipe_reproduces(recipe: dict[str, Any], vectors: TaskVectors, lambdas: torch.Tensor) -> None:
    """Plan the written recipe (headers only) and check that every tensor resolves, for every model,
    to exactly its learned coefficient; a mismatch is a bug, never written out."""
    from mergesmith.api import plan_merge

    plan = plan_merge(recipe)
    try:
        column = dict(zip(vectors.names, vectors.columns))
        for task in plan.tensors:
            if task.name not in column:
                continue
            weights = [mp["weight"] for k, mp in enumerate(task.model_params) if k != task.base_index]
            expected = [_value(x) for x in lambdas[:, column[task.name]]]
            if weights != expected:
                raise RuntimeError(f"{task.name}: the written recipe gives weights {weights}, learned {expected}; "
                                   "this is a bug in mergesmith adamerge")
    finally:
        for m in plan.models:
            m.checkpoint.close()


def plot_coefficients(vectors: TaskVectors, lambdas: torch.Tensor, path: Path, granularity: str) -> None:
    """A PNG of λ per layer (one line per model; the tensors outside the layers as a separate point)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    values = lambdas.cpu().numpy()
    for t, model in enumerate(vectors.models):
        label = Path(model).name or model
        if granularity == "task":
            ax.plot([0, max(vectors.layers - 1, 1)], [values[t, 0]] * 2, label=label)
        else:
            line, = ax.plot(range(vectors.layers), values[t, :vectors.layers], marker="o", markersize=3, label=label)
            ax.plot([vectors.layers], [values[t, vectors.layers]], marker="s", color=line.get_color())
    ax.set_xlabel("layer" + ("" if granularity == "task" else f" (square at {vectors.layers}: embeddings, "
                             "final norm, lm_head)"))
    ax.set_ylabel("λ (weight of the task vector)")
    ax.set_title(f"AdaMerging coefficients ({granularity}-wise{', TIES-pruned' if vectors.elect else ''})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ----------------------------------------------------------------------------- checks and the whole flow


def side_files(out: PathLike) -> tuple[Path, Path]:
    """The PNG and the trace JSON written beside the recipe ``out``."""
    out = Path(out)
    return out.with_suffix(".png"), out.with_suffix(".json")


def argument_problems(recipe: PathLike, task_files: list[str], out: PathLike, settings: AdaMergingSettings,
                      *, overwrite: bool = False, plot: bool = True) -> list[str]:
    """Every problem with the arguments and the recipe that can be found without reading a weight."""
    problems = at_least("--steps", settings.steps, 1) + at_least("--batch-size", settings.batch_size, 1)
    problems += at_least("--samples", settings.samples, 1, optional=True)
    problems += choice_problems("--granularity", settings.granularity, GRANULARITIES)
    if not (isinstance(settings.lr, (int, float)) and math.isfinite(settings.lr) and settings.lr > 0):
        problems.append(f"--lr {settings.lr}: must be a positive number (the paper's is 1e-3)")
    if not (isinstance(settings.init, (int, float)) and math.isfinite(settings.init)):
        problems.append(f"--init {settings.init}: must be a finite number (the paper's is 0.3)")
    problems += device_problems(settings.device)
    if not task_files:
        problems.append("--tasks: give at least one task file (JSONL, competition CSV or YAML task config)")
    for name in task_files:
        if not Path(name).expanduser().is_file():
            problems.append(f"--tasks {name}: no such file; give a task file (JSONL, competition CSV or YAML task "
                            "config)")
    if plot:
        from mergesmith.extras import extra_problems

        problems += [p + " (or pass --no-plot)" for p in extra_problems("mergesmith adamerge", "zoo", ["matplotlib"])]
    if Path(out).suffix.lower() not in (".yml", ".yaml"):
        problems.append(f"--out {out}: give a recipe file name ending in .yml or .yaml (the PNG and JSON "
                        "are written beside it)")
    inputs = {f"task file {f}": f for f in task_files}
    if not isinstance(recipe, dict):  # a recipe given as a dict has no file to protect
        inputs[f"the recipe {recipe}"] = recipe
    png, trace = side_files(out)
    for path in (Path(out), trace) + ((png,) if plot else ()):
        problems += [f"--out {p}" for p in output_problems(path, inputs, what="--out", file=True)]
        if path.is_dir():
            problems.append(f"--out {out}: {path} is a folder; give a file name")
        elif path.exists() and not overwrite:
            problems.append(f"--out {out}: {path} already exists; choose another name or pass --overwrite")
    return problems + recipe_problems(recipe, settings)


def _raw_with_default_weight(raw: dict[str, Any], init: float) -> dict[str, Any]:
    """The recipe with a global ``weight`` where it has none: adamerge replaces every weight anyway."""
    raw = copy.deepcopy(raw)
    params = raw.get("parameters")
    if params is None:
        raw["parameters"] = {"weight": init}
    elif isinstance(params, dict) and "weight" not in params:
        params["weight"] = init
    return raw


def recipe_problems(recipe: PathLike, settings: AdaMergingSettings) -> list[str]:
    """Why the recipe cannot be learned on: not task_arithmetic/ties, no base model, slices."""
    try:
        raw, where = read_recipe_raw(recipe)
    except InputError as err:
        return err.problems
    method = raw.get("merge_method")
    problems = []
    if method not in METHODS:
        problems.append(f"{where}: merge_method = {method!r}: adamerge learns the task-vector weights of a "
                        "task_arithmetic recipe (or ties with --prune); change merge_method")
    elif method == "ties" and not settings.prune:
        problems.append(f"{where}: merge_method = ties: pass --prune to learn on TIES-trimmed task vectors "
                        "(AdaMerging++), or use merge_method: task_arithmetic")
    if not raw.get("base_model"):
        problems.append(f"{where}: base_model is missing: AdaMerging learns the weights of task vectors "
                        "θ_t − θ_0, so add base_model: (the model the others were fine-tuned from)")
    if raw.get("slices") is not None:
        problems.append(f"{where}: slices: is not supported by adamerge; list whole models under models:")
    if problems:
        return problems
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the merge warns later; here only errors matter
            load_recipe(_raw_with_default_weight(raw, settings.init))
    except InputError as err:
        return [p.replace("recipe:", f"{where}:", 1) for p in err.problems]
    # the base model is run to learn on (the others' tensors are only read): one transformers can build
    return [f"{where}: base_model: {p}" for ref in model_refs_of({"base_model": raw["base_model"]})
            for p in runnable_problems(split_lora_ref(ref)[0])]


def learn_adamerging(recipe: PathLike, task_files: list[str], settings: AdaMergingSettings, *,
                     should_stop: Optional[Callable[[], bool]] = None, objectives: bool = True) -> AdaMergingResult:
    """Load the base model and the task vectors of ``recipe``, learn λ on the prompts of ``task_files``
    and return the learned recipe (nothing is written). Arguments are assumed checked
    (``argument_problems``). ``should_stop``: asked before every step (see ``learn``). Without
    ``objectives`` the objective over all prompts is not evaluated before and after (NaN), which
    saves two passes over the data where time is counted (``mergesmith compete``).
    """
    from mergesmith.api import plan_merge
    from mergesmith.evaluate.model import load_model

    raw, where = read_recipe_raw(recipe)
    parsed = load_recipe(_raw_with_default_weight(raw, settings.init))
    parsed.source_name = where
    plan = plan_merge(parsed)  # headers only: model folders, shapes, every tensor's inputs
    try:
        torch.manual_seed(settings.seed)
        device = resolve_device(settings.device)
        base_path = plan.models[plan.reference].path
        lm = load_model(str(base_path), device=device, dtype=torch.float32)
        tasks = encode_prompts(lm, task_files, settings)
        vectors = load_task_vectors(plan, lm, settings)
    finally:
        for m in plan.models:
            m.checkpoint.close()
    start = torch.full((len(vectors.models), (vectors.layers + 1) if settings.granularity == "layer" else 1),
                       float(settings.init), device=lm.device)
    nan = float("nan")
    before = objective(lm, tasks, merged_parameters(vectors, start), settings.batch_size) if objectives else nan
    lambdas, losses = learn(vectors, lm, tasks, settings, should_stop)
    after = objective(lm, tasks, merged_parameters(vectors, lambdas), settings.batch_size) if objectives else nan
    learned = learned_recipe(raw, vectors, lambdas.cpu(), settings)
    check_recipe_reproduces(learned, vectors, lambdas.cpu())
    return AdaMergingResult(lambdas.cpu(), learned, losses, before, after, vectors, lm)


def write_learned(result: AdaMergingResult, out: PathLike, settings: AdaMergingSettings, *, where: str,
                  task_files: list[str], plot: bool = True) -> None:
    """The learned recipe at ``out``, its trace (.json) and plot (.png) beside it, each written whole."""
    out = Path(out)
    png, trace = side_files(out)
    pruned = ", TIES-pruned" if settings.prune else ""
    steps = len(result.losses)
    cut = "" if steps == settings.steps else f" (stopped at its time budget, of {settings.steps})"
    scores = ("" if math.isnan(result.objective_before) else
              f"# Entropy objective {result.objective_before:.4f} at λ = {settings.init:g}, "
              f"{result.objective_after:.4f} learned.\n")
    header = (f"# Learned by mergesmith adamerge (AdaMerging, Yang et al. ICLR 2024{pruned}): "
              f"{settings.granularity}-wise, {steps} steps{cut}, seed {settings.seed}.\n"
              f"{scores}# Run it with: mergesmith merge THIS_FILE OUT_DIR\n")
    _write_atomic(out, header + yaml.safe_dump(result.recipe, sort_keys=False, allow_unicode=True))
    nan_free = {k: (None if math.isnan(v) else v) for k, v in (("objective_before", result.objective_before),
                                                               ("objective_after", result.objective_after))}
    _write_atomic(trace, json.dumps({
        "method": "adamerging", "settings": {k: v for k, v in vars(settings).items() if k != "progress"},
        "recipe": where, "tasks": task_files, "models": result.vectors.models, "layers": result.vectors.layers,
        "steps_done": steps, "lambdas": result.lambdas.tolist(), "losses": result.losses, **nan_free},
        indent=2) + "\n")
    if plot:
        plot_coefficients(result.vectors, result.lambdas, png, settings.granularity)


def adamerge(recipe: PathLike, task_files: list[str], out: PathLike, settings: Optional[AdaMergingSettings] = None,
             *, overwrite: bool = False, plot: bool = True,
             should_stop: Optional[Callable[[], bool]] = None) -> AdaMergingResult:
    """Learn AdaMerging coefficients for ``recipe`` on the prompts of ``task_files``; write the learned
    recipe to ``out`` (a .yml), its coefficients' plot beside it (.png) and a trace (.json).

    Raises one ``InputError`` with every problem of the arguments before any weight is read.
    """
    settings = settings or AdaMergingSettings()
    task_files = [str(f) for f in task_files]
    problems = argument_problems(recipe, task_files, out, settings, overwrite=overwrite, plot=plot)
    if problems:
        raise InputError(problems)
    result = learn_adamerging(recipe, task_files, settings, should_stop=should_stop)
    write_learned(result, out, settings, where=read_recipe_raw(recipe)[1], task_files=task_files, plot=plot)
    return result


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
