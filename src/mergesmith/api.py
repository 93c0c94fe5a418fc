"""The merge as the library's callers run it: the engine, with calibrate's statistics wired in.

The engine plans and streams a merge; a data-aware method's statistics reach it through an
interface it defines (``engine.plan.StatisticsSource``), and it never imports ``calibrate``,
which sits above it. Here the two meet: ``plan_merge`` and ``merge`` are the engine's, with
``calibrate.CALIBRATION`` as the source. ``mergesmith.merge``, the commands, evaluation,
learning and search plan and merge through these.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

from mergesmith.calibrate import CALIBRATION
from mergesmith.engine import plan as engine_plan
from mergesmith.engine import run as engine_run
from mergesmith.engine.merge_plan import MergePlan, MergeResult
from mergesmith.engine.options import MergeOptions
from mergesmith.recipe import Recipe


def plan_merge(recipe: Union[str, Path, dict, Recipe], options: Optional[MergeOptions] = None, *,
               out_dir: Optional[Union[str, Path]] = None, writing: bool = False) -> MergePlan:
    """``engine.plan.plan_merge``, its statistics from ``calibrate``."""
    return engine_plan.plan_merge(recipe, options, out_dir=out_dir, writing=writing, statistics=CALIBRATION)


def merge(recipe: Union[str, Path, dict, Recipe], out_dir: Union[str, Path], *, dry_run: bool = False,
          options: Optional[MergeOptions] = None, **kwargs: Any) -> MergeResult:
    """``engine.run.merge``, its statistics from ``calibrate`` (computed first where missing)."""
    return engine_run.merge(recipe, out_dir, dry_run=dry_run, options=options, statistics=CALIBRATION, **kwargs)
