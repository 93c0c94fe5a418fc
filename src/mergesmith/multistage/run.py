"""Running a multi-stage recipe: every stage checked first, then each one merged in file order
through ``api.merge`` (so each has ``merge``'s guarantees: planned before any of its weights
is read, its output locked, written under a hidden name and renamed when finished, removed if
the run stops), cached stages reused, and the intermediates this run made removed unless kept.

One run at a time holds the intermediate folder (``paths.OutputLock`` on it): a second run
that would share its cache stops at once, instead of removing what the first one reads.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from mergesmith.api import merge
from mergesmith.engine.options import MergeOptions
from mergesmith.errors import InputError
from mergesmith.multistage.plan import MultiPlan, StagePlan, labelled, plan_multi
from mergesmith.paths import OutputLock


@dataclass
class MultiResult:
    plan: MultiPlan
    ran: list[str]  # the stages merged by this run ("" for the final stage), in order
    reused: list[str]  # the cached stages read instead of merged
    removed: list[Path]  # the intermediates removed at the end
    seconds: float = 0.0


def run_multi(path: Union[str, Path], out_dir: Union[str, Path], *, options: Optional[MergeOptions] = None,
              intermediate_dir: Optional[Union[str, Path]] = None, keep_intermediates: bool = False,
              dry_run: bool = False) -> MultiResult:
    """Merge a multi-stage recipe file (mergekit-multi's format) into ``out_dir``.

    Raises one ``InputError`` naming every problem of every stage before any stage runs;
    ``dry_run`` stops there. ``options`` apply to every stage (``overwrite`` to the final
    output only: an intermediate is never replaced, its folder name carries its key).
    """
    options = options or MergeOptions()
    plan = plan_multi(path, out_dir, options, intermediate_dir=intermediate_dir,
                      keep_intermediates=keep_intermediates, writing=not dry_run)
    if dry_run:
        return MultiResult(plan, [], [], [])
    start = time.perf_counter()
    ran: list[str] = []
    reused: list[str] = []
    made: list[StagePlan] = []  # intermediates this run wrote
    removed: list[Optional[Path]] = []
    plan.intermediate_dir.mkdir(parents=True, exist_ok=True)
    with OutputLock(plan.intermediate_dir):
        try:
            for k, sp in enumerate(plan.stages):
                if sp.cached and sp.out_dir.is_dir():
                    _say(f"{sp.stage.title}: cached at {sp.out_dir}", options)
                    reused.append(sp.stage.name or "")
                    continue
                _say(f"{sp.stage.title} ({k + 1} of {len(plan.stages)}): merging into {sp.out_dir}", options)
                stage_options = options if sp.final else dataclasses.replace(options, overwrite=False)
                with labelled(sp.stage.label) as caught:
                    try:
                        merge(sp.recipe, sp.out_dir, options=stage_options)
                    except InputError as err:
                        caught += err.problems
                if caught.problems:
                    raise InputError(caught.problems)
                ran.append(sp.stage.name or "")
                if not sp.final:
                    made.append(sp)
                if not keep_intermediates:  # free the disk as soon as no later stage reads an intermediate
                    for done in [m for m in made if not _read_after(plan, m, k)]:
                        removed.append(_remove(done, plan.intermediate_dir))
                        made.remove(done)
        finally:
            if not keep_intermediates:
                removed += [_remove(m, plan.intermediate_dir) for m in made]
                _remove_if_empty(plan.intermediate_dir)
    removed = [p for p in removed if p is not None]
    return MultiResult(plan, ran, reused, removed, time.perf_counter() - start)


def _read_after(plan: MultiPlan, made: StagePlan, k: int) -> bool:
    """Whether a stage after the ``k``-th reads ``made``'s output."""
    return any(made.stage.name in later.stage.uses for later in plan.stages[k + 1:])


def _remove(sp: StagePlan, inter: Path) -> Optional[Path]:
    """Remove an intermediate this run made; its path, or None (with a warning) if it could not be."""
    shutil.rmtree(sp.out_dir, ignore_errors=True)  # never hide the error that stopped the run behind this one
    if sp.out_dir.exists():
        warnings.warn(f"{sp.out_dir}: could not remove this intermediate; remove it by hand", stacklevel=2)
        return None
    # The stage's lock file: no other run can be waiting on it while this run holds the folder's lock.
    (inter / f".{sp.out_dir.name}.lock").unlink(missing_ok=True)
    return sp.out_dir


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:  # not empty (kept intermediates of earlier runs), or gone
        pass


def _say(text: str, options: MergeOptions) -> None:
    if options.progress:
        print(text, file=sys.stderr, flush=True)
