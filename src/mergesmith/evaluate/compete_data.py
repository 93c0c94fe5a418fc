"""Data-aware merges in competition mode: what ``compete`` runs before the merge, and on which data.

Two kinds of recipe need data before they can be merged (docs/evaluate.md, "Data-aware merges"):

- a method that reads calibration statistics (``regmean``, ``regmean_plusplus``, ``fisher``): a
  recipe without any ``calibration:`` data gets the competition's ``--validation`` files as every
  model's calibration data (prompts only), and says so. Its statistics are computed in a
  ``calibrate`` phase that counts against the budget (``calibrate_recipe``);
- ``--adamerge``: the recipe's task-vector weights are learned by AdaMerging on the *unlabeled*
  prompts of the competition's own ``--tasks`` (the paper's test-time setting; no answer is read)
  in a ``learn`` phase (``learn_recipe``), stopped at its share of the budget with the weights
  learned so far. The learned recipe, ``OUT/learned.yml``, is what is merged.

The functions run in compete's child process, so that they can be stopped at the budget; what a
stopped child leaves (a half-written cache entry, a temporary recipe file) is removed by
``clean_after``. Nothing here knows about budgets beyond a deadline handed in.
"""

from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from mergesmith.errors import InputError

PLAIN, CALIBRATE, ADAMERGE = "plain", "calibrate", "adamerge"
LEARNED_RECIPE = "learned.yml"


@dataclass
class DataPlan:
    """What compete does before the merge: nothing, collect statistics, or learn AdaMerging weights."""

    kind: str
    recipe: Any  # the recipe to check (and merge, unless learned): as given, or a dict with calibration added
    notes: list[str] = field(default_factory=list)  # said on the terminal and in compete.json
    cache_dir: Optional[Path] = None  # the statistics cache (CALIBRATE), for cleaning after a stopped child
    learn_files: list[str] = field(default_factory=list)  # ADAMERGE: whose prompts are learned on
    settings: Any = None  # ADAMERGE: AdaMergingSettings


def plan_data(recipe: Any, task_paths: Sequence[Union[str, Path]], validation: Sequence[Union[str, Path]],
              adamerge: Any = None) -> DataPlan:
    """Decide what runs before the merge; every problem is raised at once, before any weight is read.

    ``adamerge``: ``AdaMergingSettings`` to learn the recipe's weights on the prompts of
    ``task_paths``, or None.
    """
    from mergesmith.methods import all_methods
    from mergesmith.recipe import read_recipe_raw

    validation = [str(v) for v in validation]
    problems = [f"--validation {v}: no such file; give a task file (JSONL, competition CSV or YAML task config)"
                for v in validation if not Path(v).expanduser().is_file()]
    try:
        raw, where = read_recipe_raw(recipe)
    except InputError as err:  # the recipe check reports it, with the others
        if problems:
            raise InputError(problems) from None
        return DataPlan(PLAIN, recipe)
    if adamerge is not None:
        return _plan_adamerge(recipe, raw, where, [str(t) for t in task_paths], adamerge, problems)
    spec = all_methods().get(raw.get("merge_method"))
    if spec is None or not spec.needs_stats:
        if problems:
            raise InputError(problems)
        notes = ([f"--validation is not used: merge_method {raw.get('merge_method')} needs no calibration data"]
                 if validation and spec is not None else [])
        return DataPlan(PLAIN, recipe, notes)
    has_data = raw.get("calibration") is not None or any(
        isinstance(m, dict) and m.get("calibration") for m in raw.get("models") or [])
    notes = []
    if not has_data:
        if not validation:
            problems.append(f"{where}: merge_method {spec.name} needs calibration data and the recipe has no "
                            "calibration: block; pass --validation FILES (the competition's validation tasks, "
                            "used as every model's calibration data) or add a calibration: block")
        else:
            raw = copy.deepcopy(raw)
            raw["calibration"] = {"files": validation}
            recipe = raw
            notes.append(f"calibration data: {where} has no calibration: block, so every model's "
                         f"{', '.join(spec.needs_stats)} statistics come from the --validation files "
                         f"({', '.join(validation)}; prompts only)")
    elif validation:
        notes.append(f"--validation is not used: {where} names its own calibration data")
    if problems:
        raise InputError(problems)
    return DataPlan(CALIBRATE, recipe, notes, cache_dir=_cache_dir(raw))


def _plan_adamerge(recipe: Any, raw: dict, where: str, task_paths: list[str], settings: Any,
                   problems: list[str]) -> DataPlan:
    from mergesmith.checks import at_least
    from mergesmith.learn.adamerging import _raw_with_default_weight, recipe_problems

    problems = list(problems) + at_least("--learn-steps", settings.steps, 1) \
        + at_least("--learn-batch-size", settings.batch_size, 1)
    # A ties recipe means AdaMerging++ (the TIES trim and sign election, with its density).
    settings = replace(settings, prune=raw.get("merge_method") == "ties")
    problems += [p.replace("--prune", "a ties recipe") for p in recipe_problems(recipe, settings)]
    if problems:
        raise InputError(problems)
    kind = "AdaMerging++ (ties)" if settings.prune else "AdaMerging (task_arithmetic)"
    notes = [f"{kind}: {settings.granularity}-wise weights learned on the unlabeled prompts of the --tasks files "
             f"(answers are never read), up to {settings.steps} steps within the learning share of the budget; "
             f"the learned recipe is written to OUT/{LEARNED_RECIPE} and merged"]
    return DataPlan(ADAMERGE, _raw_with_default_weight(raw, settings.init), notes, learn_files=task_paths,
                    settings=settings)


def _cache_dir(raw: dict) -> Path:
    from mergesmith.calibrate.store import default_cache_dir

    block = raw.get("calibration") or {}
    given = block.get("cache_dir") if isinstance(block, dict) else None
    return Path(given).expanduser() if given else default_cache_dir()


def missing_statistics(recipe: Any) -> list[str]:
    """'model: kind' for every statistic the recipe's merge would compute (headers and task files only)."""
    from mergesmith.api import plan_merge

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = plan_merge(recipe)
    try:
        return [f"{m.ref}: {k}" for m, kinds in plan.stats.missing() for k in kinds] if plan.stats else []
    finally:
        for m in plan.models:
            m.checkpoint.close()


# ----------------------------------------------------------------------------- in the child process


def calibrate_recipe(recipe: Any, device: str = "cpu") -> list[str]:
    """Compute and cache every statistic the recipe's merge needs; returns what was computed."""
    from mergesmith.api import plan_merge

    plan = plan_merge(recipe)
    try:
        if plan.stats is not None and plan.stats.missing():
            plan.stats.compute(device, progress=False, plan=plan)
        return list(plan.stats.computed) if plan.stats is not None else []
    finally:
        for m in plan.models:
            m.checkpoint.close()


@dataclass(frozen=True)
class Deadline:
    """A moment on the system's monotonic clock, which every process on the machine shares."""

    at: float

    def __call__(self) -> bool:
        return time.monotonic() >= self.at


def learn_recipe(recipe: Any, task_files: list[str], out: Path, settings: Any, should_stop: Any) -> dict[str, Any]:
    """Learn AdaMerging weights until ``settings.steps`` or ``should_stop()``; write ``out`` (and its
    trace beside it, each file whole). The objective over all prompts is not evaluated: it would
    cost two passes over the data inside the budget."""
    from mergesmith.learn.adamerging import learn_adamerging, write_learned

    result = learn_adamerging(recipe, task_files, settings, should_stop=should_stop, objectives=False)
    write_learned(result, out, settings, where="compete", task_files=task_files, plot=False)
    return {"steps": len(result.losses), "of": settings.steps,
            "last_loss": result.losses[-1] if result.losses else None}


def clean_after(plan: DataPlan, out: Path, pid: int) -> None:
    """Remove what a stopped (or dead) child ``pid`` was writing: half a cache entry, the learned recipe."""
    if plan.kind == CALIBRATE and plan.cache_dir is not None:
        from mergesmith.calibrate.store import remove_partial_entries

        remove_partial_entries(plan.cache_dir, pid)
    if plan.kind == ADAMERGE:  # a recipe learned by a run that did not finish is not kept either
        for name in (LEARNED_RECIPE, Path(LEARNED_RECIPE).with_suffix(".json").name):
            for path in (out / f".{name}.tmp-{pid}", out / name):
                if path.exists():
                    path.unlink()
