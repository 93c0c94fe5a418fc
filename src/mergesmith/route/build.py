"""``build_routed(recipe, out)``: check everything, fit the router, write the routed model folder.

Steps, each a function: ``route_problems`` (the recipe, every model reference, every data file,
the output path: all problems at once), ``fit_router`` (features of each expert's example prompts
from the base model, then the kind's fit), ``choose_threshold`` (the fallback's cut on validation),
and the folder written beside OUT, then renamed into place (``copy`` puts the models inside).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch

from mergesmith.errors import InputError
from mergesmith.evaluate.features import mean_last_hidden
from mergesmith.evaluate.model import load_model, model_path_problems, split_adapter_ref
from mergesmith.evaluate.tasks import Task, load_tasks
from mergesmith.paths import output_problems
from mergesmith.route import routers
from mergesmith.route.folder import ModelRef, RoutedModel, ref_digests, write_routed
from mergesmith.route.recipe import (RouteRecipe, expert_names, read_route_recipe, looks_like_test,
                                     recipe_problems, unlabelled_problem)


@dataclass
class RouteOptions:
    copy: bool = False
    overwrite: bool = False
    device: str = "cpu"
    progress: bool = False


def _model_paths(ref: str) -> list[Path]:
    path, adapter = split_adapter_ref(ref)
    return [Path(p).expanduser() for p in (path, adapter) if p]


def route_problems(recipe: RouteRecipe, where: str, out: Path, options: RouteOptions) -> tuple[list[str], list]:
    """Every problem with the models, the data and the output; the experts' loaded tasks."""
    problems = []
    refs = [("base_model", recipe.base_model)] if recipe.base_model else []
    refs += [(f"experts[{k}].model", e.model) for k, e in enumerate(recipe.experts)]
    refs += [("fallback.model", recipe.fallback.model)] if recipe.fallback else []
    for field, ref in refs:
        if not all(p.is_dir() for p in _model_paths(ref)):
            problems.append(f"{where}: {field}: {ref}: a routed model names local folders (model, or "
                            "model+adapter); no such folder")
        else:
            problems += [f"{where}: {field}: {p}" for p in model_path_problems(ref)]
    inputs = {ref: p for _, ref in refs for p in _model_paths(ref)}
    problems += output_problems(out, {**inputs, where: Path(where)})
    if out.exists() and not options.overwrite:
        problems.append(f"{out}: already exists; choose another output folder or pass --overwrite")
    expert_tasks: list[list[Task]] = []
    for k, e in enumerate(recipe.experts):
        tasks: list[Task] = []
        for f in e.data:
            if looks_like_test(f) or not Path(f).is_file():
                continue  # said by recipe_problems
            try:
                loaded = load_tasks([f])
            except InputError as err:
                problems += [f"{where}: experts[{k}].data: {p}" for p in err.problems]
                continue
            if recipe.router.kind == "classifier":
                why = unlabelled_problem(f, loaded)
                if why:
                    problems.append(f"{where}: experts[{k}].data: {why}")
            tasks += loaded
        expert_tasks.append(tasks)
    return problems, expert_tasks


def fit_router(recipe: RouteRecipe, expert_tasks: list[list[Task]], options: RouteOptions) -> dict[str, torch.Tensor]:
    """The router's tensors: centroids (experts, hidden), or the classifier's mean, std, weight, bias."""
    if recipe.router.kind not in routers.FEATURE_KINDS:
        return {}
    texts = [[item.prompt for t in tasks for item in t.items] for tasks in expert_tasks]
    lm = load_model(recipe.base_model, device=options.device)
    feats = mean_last_hidden(lm, [x for group in texts for x in group], recipe.batch_size, options.progress)
    labels = torch.tensor([k for k, group in enumerate(texts) for _ in group])
    if recipe.router.kind == "centroid":
        return {"centroids": routers.fit_centroids(feats, labels, len(texts))}
    return routers.fit_classifier(feats, labels, len(texts), l2=recipe.router.l2, steps=recipe.router.steps)


def choose_threshold(recipe: RouteRecipe, routed: RoutedModel, options: RouteOptions) -> Optional[float]:
    """A number given in the recipe, or (``auto``) the cut that maximises the routed system's mean
    headline score over the validation items: every expert and the fallback answer every item once,
    and ``routers.best_threshold`` picks the cut."""
    fb = recipe.fallback
    if fb is None or recipe.router.kind == "oracle":
        return None
    if fb.threshold != "auto":
        return float(fb.threshold)
    from mergesmith.evaluate.routed import Resident, route_items
    from mergesmith.evaluate.runner import evaluate

    tasks = load_tasks(fb.validation)
    resident = Resident(lambda ref: load_model(ref, device=options.device))
    try:
        routing = route_items(routed, tasks, resident, recipe.batch_size)  # threshold None: never falls back
    finally:
        resident.close()
    item_scores = []
    for model in routing.models:
        result = evaluate(routed.resolve(model), tasks, device=options.device, batch_size=recipe.batch_size,
                          bootstrap=0, progress=options.progress)
        item_scores.append([p.scores[t.headline] if p.scores else 0.0
                            for t in tasks for p in result.predictions if p.task == t.name])
    chosen = [c for row in routing.chosen for c in row]
    confidence = [c for row in routing.confidence for c in row]
    expert = [item_scores[c][i] for i, c in enumerate(chosen)]
    return routers.best_threshold(confidence, expert, item_scores[-1])


def _copy_model(ref: str, folder: Path, under: str) -> str:
    """Copy a model (and its adapter) to ``folder/under``; the reference relative to ``folder``."""
    path, adapter = split_adapter_ref(ref)
    parts = []
    for part, src in (("model", path), ("adapter", adapter)):
        if src:
            shutil.copytree(Path(src).expanduser(), folder / under / part)
            parts.append(f"{under}/{part}")
    return "+".join(parts)


def _absolute(ref: str) -> str:
    return "+".join(str(p.resolve()) for p in _model_paths(ref))


def check_route(recipe_path: Union[str, Path], out: Path, options: RouteOptions) -> tuple[RouteRecipe, list]:
    """The recipe and the experts' data tasks; every problem with the recipe, the models, the data and
    the output raised together, before any model is loaded."""
    where = str(recipe_path)
    recipe = read_route_recipe(recipe_path, check=False)
    problems, expert_tasks = route_problems(recipe, where, out, options)
    problems = recipe_problems(recipe, where) + problems
    if problems:
        raise InputError(problems)
    return recipe, expert_tasks


def route_as_merge(recipe: Union[str, Path], out_dir: Path, *, device: str = "cpu", overwrite: bool = False) -> None:
    """``build_routed`` with a merge function's signature, for ``compete``'s build phase."""
    build_routed(recipe, out_dir, options=RouteOptions(overwrite=overwrite, device=device))


def check_route_as_merge(recipe: Union[str, Path], out_dir: Path, *, device: str = "cpu",
                         overwrite: bool = False) -> None:
    """``check_route`` with a merge check's signature, for ``compete``'s checks (compete says itself
    whether its ``OUT/model`` may be replaced)."""
    check_route(recipe, Path(out_dir), RouteOptions(overwrite=True, device=device))


def build_routed(recipe_path: Union[str, Path], out_dir: Union[str, Path], *,
                 options: Optional[RouteOptions] = None) -> RoutedModel:
    """Build the routed model folder ``out_dir`` from the routing recipe (see docs/route.md)."""
    options = options or RouteOptions()
    out = Path(out_dir)
    recipe, expert_tasks = check_route(recipe_path, out, options)
    names = expert_names(recipe)
    experts = [ModelRef(name, _absolute(e.model), sorted({t.name for t in tasks} | set(e.tasks)))
               for name, e, tasks in zip(names, recipe.experts, expert_tasks)]
    base = ModelRef("base", _absolute(recipe.base_model)) if recipe.base_model else None
    fallback = ModelRef("fallback", _absolute(recipe.fallback.model)) if recipe.fallback else None
    settings = {"router": recipe.router.model_dump(), "batch_size": recipe.batch_size,
                "fitted_on": {n: [str(Path(f).resolve()) for f in e.data] for n, e in zip(names, recipe.experts)},
                "validation": [str(Path(f).resolve()) for f in recipe.fallback.validation] if recipe.fallback else []}
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    partial.chmod(0o755)  # mkdtemp makes it private; the finished folder is an ordinary one
    try:  # written beside OUT, renamed into place: an interrupted build leaves no half folder
        routed = RoutedModel(partial, recipe.router.kind, experts, base, fallback, None, settings,
                             fit_router(recipe, expert_tasks, options))
        threshold = choose_threshold(recipe, routed, options)
        routed.threshold = threshold if threshold is None or threshold > float("-inf") else None
        if options.copy:
            for model, under in [(base, "base"), (fallback, "fallback"),
                                 *((e, f"experts/{e.name}") for e in experts)]:
                if model is not None:
                    model.ref = _copy_model(model.ref, partial, under)
        for model in [m for m in (base, fallback, *experts) if m is not None]:
            model.files = ref_digests(routed.resolve(model))
        write_routed(routed)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    routed.folder = out
    return routed
