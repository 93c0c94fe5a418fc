"""Run a merge end to end: plan, lock the output, compute missing statistics, stream."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional, Union

from mergesmith.checkpoint.writer import remove_stale_partials
from mergesmith.checks import pick_device
from mergesmith.engine.merge_plan import MergeResult
from mergesmith.engine.options import MergeOptions
from mergesmith.engine.plan import StatisticsSource, plan_merge
from mergesmith.engine.stream import execute_plan
from mergesmith.errors import InputError
from mergesmith.paths import OutputLock
from mergesmith.recipe import Recipe


def merge(recipe: Union[str, Path, dict, Recipe], out_dir: Union[str, Path], *, dry_run: bool = False,
          options: Optional[MergeOptions] = None, statistics: Optional[StatisticsSource] = None,
          **kwargs: Any) -> MergeResult:
    """Merge the models a recipe names into ``out_dir`` (a Hugging Face model folder).

    ``recipe`` is a mergekit-style YAML path, a dict, or a loaded ``Recipe``.
    Keyword arguments override ``MergeOptions`` fields (``device``, ``threads``,
    ``out_shard_size``, ``overwrite``, ...). With ``dry_run`` nothing is written.
    ``statistics``: where a data-aware method's statistics come from (``plan_merge``);
    ``mergesmith.merge`` and ``mergesmith.api.merge`` pass calibrate's.
    Raises ``InputError`` listing every problem with the recipe or the models.
    """
    # A copy: the caller's options object is left as it was (replace also rejects unknown names).
    options = dataclasses.replace(options or MergeOptions(), **kwargs)
    out_dir = Path(out_dir)
    plan = plan_merge(recipe, options, out_dir=out_dir, writing=not dry_run, statistics=statistics)
    try:
        if dry_run:
            return MergeResult(None, plan)
        # Planning read only headers; the lock comes before any weight is read, so a second run on
        # this output stops here, at once.
        with OutputLock(out_dir):
            # A run killed outright (SIGKILL) left its hidden folders: remove them, and put back a
            # previous model it had moved aside, before deciding whether the output exists.
            remove_stale_partials(out_dir)
            if out_dir.exists() and not options.overwrite:  # another run may have finished meanwhile
                raise InputError(f"{out_dir}: already exists; choose another output directory or pass --overwrite")
            if plan.stats is not None and plan.stats.missing():
                plan.stats.compute(str(pick_device(options.device)), options.progress, plan)
                plan.stats.attach(plan)
            return execute_plan(plan, out_dir, options)
    finally:
        for m in plan.models:
            m.checkpoint.close()
