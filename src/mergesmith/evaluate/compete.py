"""Competition mode: merge, then evaluate, as one job under a wall-clock budget.

Phases, each timed against the one budget: ``load_tasks`` (every task file checked
before any compute is spent), ``check_recipe`` (a dry-run plan: configs and
headers only), ``merge``, ``load_model``, ``evaluate``, ``write``.

The merge runs in a child process by default, so that it can be stopped when the
budget runs out; the evaluation stops before a batch whose estimated time would
overrun the deadline (see ``Pacer``). What was not scored is listed by task in
``compete.json`` and on the terminal. Outputs, in ``OUT``:

- ``model/``: the merged model;
- ``results.json`` and ``predictions.jsonl``: as ``mergesmith evaluate`` writes them,
  scores computed where targets exist;
- ``submission.csv`` (one per input file when there are several:
  ``submission-<stem>.csv``): the starter kit's format, ``id,prediction,dummy_field``
  for every input row in input order, the chosen index for multiple choice and the
  generated text for generation, ``dummy_field`` the kit's constant 0; an empty
  prediction for a row that was not run (or was a skipped bad row).
  ``submission_format="plain"`` leaves out ``dummy_field`` (see ``competition``);
- ``compete.json``: the budget, each phase's seconds and status, what was not scored.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import queue as queue_module
import shutil
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

from mergesmith.errors import InputError
from mergesmith.evaluate.competition import (DEFAULT_SUBMISSION_FORMAT, submission_header, submission_row,
                                             write_csv_atomic)
from mergesmith.paths import OutputLock
from mergesmith.units import parse_budget

DONE, STOPPED, SKIPPED, FAILED = "done", "stopped_at_budget", "skipped", "failed"


@dataclass
class Phase:
    name: str
    seconds: float
    status: str
    detail: str = ""


@dataclass
class CompeteResult:
    budget_s: float
    phases: list[Phase] = field(default_factory=list)
    evaluation: Any = None  # EvalResult (every item not_run when the merge used up the budget)
    submissions: list[Path] = field(default_factory=list)
    not_scored: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what compete decided for the user (calibration data, ...)
    search: Optional[dict[str, Any]] = None  # the search's summary, when RECIPE was a search space

    @property
    def used_s(self) -> float:
        return sum(p.seconds for p in self.phases)

    @property
    def complete(self) -> bool:
        return not self.not_scored and all(p.status == DONE for p in self.phases)

    def to_dict(self) -> dict[str, Any]:
        return {"budget_s": self.budget_s, "used_s": self.used_s, "complete": self.complete,
                "phases": [asdict(p) for p in self.phases], "not_scored": self.not_scored, "notes": self.notes,
                "submissions": [str(p) for p in self.submissions],
                "macro_average": self.evaluation.macro if self.evaluation else None,
                **({"search": self.search} if self.search is not None else {})}

    def summary(self) -> str:
        lines = [f"note: {n}" for n in self.notes] + [f"budget {self.budget_s:.0f}s, used {self.used_s:.1f}s"]
        lines += [f"  {p.name:<12} {p.seconds:8.1f}s  {p.status}" + (f"  ({p.detail})" if p.detail else "")
                  for p in self.phases]
        if self.not_scored:
            total = sum(self.not_scored.values())
            lines.append(f"NOT SCORED within the budget: {total} item(s): "
                         + ", ".join(f"{k} ({v})" for k, v in self.not_scored.items()))
        return "\n".join(lines)


# ----------------------------------------------------------------------------- merge phase


def default_merge(recipe: Any, out_dir: Path, *, device: str = "cpu", overwrite: bool = False) -> None:
    from mergesmith.api import merge

    merge(recipe, out_dir, device=device, overwrite=overwrite, progress=False)


def check_recipe(recipe: Any, out_dir: Path, *, device: str = "cpu", overwrite: bool = False) -> None:
    from mergesmith.api import merge
    from mergesmith.checkpoint.config import model_type_problem

    plan = merge(recipe, out_dir, dry_run=True, device=device, overwrite=overwrite, progress=False).plan
    # compete runs what it merges: a model transformers cannot build is refused before the merge, not after
    problem = model_type_problem(plan.out_config, plan.models[plan.reference].path / "config.json")
    if problem:
        raise InputError(problem)


def _child(send: Any, fn: Callable, args: tuple, kwargs: dict) -> None:
    try:
        send.put(("ok", fn(*args, **kwargs)))
    except InputError as err:
        send.put(("input_error", err.problems))
    except BaseException:  # reported to the parent, which decides
        send.put(("error", traceback.format_exc()))


def _identity(path: Path) -> Optional[tuple[int, int]]:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def clean_after_merge(out_dir: Path, pid: int) -> None:
    """Remove what a merge process ``pid`` that was stopped or died left beside ``out_dir``
    (the writer's partial folder; an old model moved aside is put back)."""
    from mergesmith.checkpoint.writer import clean_after

    clean_after(out_dir, pid)


def _stop(child: Any) -> None:
    if child.is_alive():
        child.terminate()
        child.join(5)
    if child.is_alive():
        child.kill()
    child.join()


def run_isolated(fn: Callable, args: tuple, kwargs: dict, timeout: float, *, what: str,
                 cleanup: Callable[[int], None], committed: Callable[[], bool] = lambda: False
                 ) -> tuple[str, str, Any]:
    """Run ``fn(*args, **kwargs)`` in a child process; stop it if it outlives ``timeout`` seconds.

    Returns (status, detail, the value ``fn`` returned). InputError in the child is raised again
    here. When the child is stopped, dies or fails, ``cleanup(pid)`` removes what it was writing,
    and so it does when this process is interrupted (Ctrl-C) while waiting. ``committed()`` says
    whether the child's work was finished (put in place atomically at its very end) although its
    "done" message had not arrived when it was stopped; ``what`` names the work in messages.
    """
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    child = ctx.Process(target=_child, args=(results, fn, args, kwargs), daemon=True)
    child.start()
    deadline = time.monotonic() + timeout
    outcome = None
    try:
        while outcome is None:
            try:
                outcome = results.get(timeout=min(0.5, max(deadline - time.monotonic(), 0.01)))
            except queue_module.Empty:
                if time.monotonic() >= deadline:
                    _stop(child)
                    outcome = _last_message(results)
                    if outcome is None:
                        done = committed()
                        cleanup(child.pid)
                        if done:
                            return DONE, "finished as the budget ran out", None
                        return STOPPED, (f"the {what} did not finish within the budget and was stopped; "
                                         "its partial output was removed"), None
                elif not child.is_alive():
                    outcome = _last_message(results)
                    if outcome is None:
                        child.join()
                        cleanup(child.pid)
                        return FAILED, f"the {what} process died (exit code {child.exitcode})", None
    except BaseException:  # Ctrl-C: stop the child and leave no partial output behind
        _stop(child)
        cleanup(child.pid)
        raise
    child.join()
    kind, payload = outcome
    if kind != "ok":
        cleanup(child.pid)
    if kind == "input_error":
        raise InputError(payload)
    if kind == "error":
        raise RuntimeError(f"the {what} failed:\n{payload}")
    return DONE, "", payload


def run_merge_isolated(merge_fn: Callable, recipe: Any, out_dir: Path, kwargs: dict,
                       timeout: float) -> tuple[str, str]:
    """Run the merge in a child process; stop it if it outlives ``timeout`` seconds.

    Returns (status, detail). InputError in the child is raised again here. A
    stopped child's partial output is removed (``clean_after_merge``), and so it
    is when this process is interrupted (Ctrl-C) while waiting.

    The merge counts as finished (DONE) if the child committed the model before it
    was stopped, even when its "done" message had not arrived yet: ``merge_fn`` must
    therefore put the model in place atomically at its very end, as the engine's
    writer does (build under a temporary name, then rename).
    """
    before = _identity(out_dir)
    status, detail, _ = run_isolated(merge_fn, (recipe, out_dir), kwargs, timeout, what="merge",
                                     cleanup=lambda pid: clean_after_merge(out_dir, pid),
                                     committed=lambda: _identity(out_dir) not in (None, before))
    return status, detail


def _last_message(results: Any) -> Optional[tuple[str, Any]]:
    """A message the child sent just before it stopped, if any (its queue feeder may lag a little)."""
    try:
        return results.get(timeout=0.2)
    except queue_module.Empty:
        return None


def run_merge_inline(merge_fn: Callable, recipe: Any, out_dir: Path, kwargs: dict, timeout: float) -> tuple[str, str]:
    """Run the merge here. It CANNOT be stopped at the budget: it runs to its end, and an
    overrun is only found afterwards. Interrupted (Ctrl-C), its partial output is removed."""
    try:
        merge_fn(recipe, out_dir, **kwargs)
    except BaseException:
        clean_after_merge(out_dir, os.getpid())
        raise
    return DONE, ""


# ----------------------------------------------------------------------------- submission


def _submission_rows(tasks: Sequence, predictions: Sequence) -> dict[str, list[tuple[int, str, str]]]:
    """Per source file, (position, id, prediction) for every input row."""
    by_source: dict[str, dict[int, tuple[int, str, str]]] = {}
    for task in tasks:
        rows = by_source.setdefault(task.source, {})
        for item in task.items:
            rows[item.position] = (item.position, item.id, "")
        for bad in task.skipped:
            rows[bad.position] = (bad.position, bad.id, "")
    for p in predictions:
        if p.prediction is not None:
            rows = by_source[p.source]
            rows[p.position] = (p.position, p.id, str(p.prediction))
    return {src: [rows[k] for k in sorted(rows)] for src, rows in by_source.items()}


def write_submissions(tasks: Sequence, predictions: Sequence, out_dir: Union[str, Path], *,
                      submission_format: str = DEFAULT_SUBMISSION_FORMAT) -> list[Path]:
    """Write the competition's submission file(s), one row per input row in input order.

    ``submission_format``: ``kit`` (default) writes ``id,prediction,dummy_field`` with
    the constant ``dummy_field`` (0) of the starter kit's evaluation script, the
    columns its Kaggle upload takes; ``plain`` writes ``id,prediction``. Each file is
    written atomically.
    """
    header = submission_header(submission_format)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    per_source = _submission_rows(tasks, predictions)
    paths = []
    used: set[str] = set()
    for source, rows in per_source.items():
        if len(per_source) == 1:
            name = "submission.csv"
        else:
            stem, n = Path(source).stem, 1
            name = f"submission-{stem}.csv"
            while name in used:
                n += 1
                name = f"submission-{stem}-{n}.csv"
        used.add(name)
        body = [submission_row(row_id, prediction, submission_format) for _, row_id, prediction in rows]
        paths.append(write_csv_atomic(out / name, header, body))
    return paths


# ----------------------------------------------------------------------------- the job


COMPETE_FILES = (r"results\.json", r"predictions\.jsonl", r"compete\.json", r"submission(-.+)?\.csv",
                 r"learned\.yml", r"learned\.json")
DEFAULT_SEARCH_SHARE = 0.5
SEARCH_DIR = "search"  # the search's own output folder inside OUT (trace.jsonl, best.yml, summary.json)


def output_problems_for(out: Path, recipe: Any, task_paths: Sequence[Union[str, Path]]) -> list[str]:
    """Why ``out`` cannot take compete's outputs (nothing is created).

    ``out`` must be a writable folder; ``out/model`` (replaced under ``--overwrite``)
    may not be, contain or lie inside a task file or the recipe, and no output file
    may land on one. The recipe's models are checked by the merge's own dry run.
    """
    from mergesmith.checks import output_dir_problems, overwritten_inputs
    from mergesmith.paths import output_problems

    inputs = [Path(p) for p in task_paths]
    if isinstance(recipe, (str, Path)):
        inputs.append(Path(recipe))
    problems = output_dir_problems(out)
    if problems:
        return problems
    problems = output_problems(out / "model", {str(p): p for p in inputs}, what="--out/model")
    return problems + overwritten_inputs(out, COMPETE_FILES, inputs)


def compete(recipe: Any, task_paths: Sequence[Union[str, Path]], out_dir: Union[str, Path], *,
            budget: Union[str, float], validation: Sequence[Union[str, Path]] = (), adamerge: Any = None,
            learn_share: float = 0.5, search_options: Any = None,
            search_share: Optional[float] = None,
            device: str = "cpu", dtype: Any = "auto", batch_size: int = 8,
            skip_bad_rows: bool = False, overwrite: bool = False, isolate_merge: bool = True,
            merge_fn: Optional[Callable] = None, check_fn: Optional[Callable] = None,
            submission_format: str = DEFAULT_SUBMISSION_FORMAT, bootstrap: int = 1000,
            metric: Optional[dict[str, str]] = None,
            progress: bool = True, write_reserve: Optional[float] = None,
            clock: Callable[[], float] = time.monotonic) -> CompeteResult:
    """Merge ``recipe`` and evaluate the result on ``task_paths`` within ``budget``.

    ``merge_fn(recipe, out_dir, device=..., overwrite=...)`` does the merge (default:
    ``mergesmith.merge``); ``check_fn`` validates the recipe first (default: a dry
    run; pass ``lambda *a, **k: None`` to skip). ``metric`` maps a task type to the
    headline metric of tasks that set none (as ``load_tasks``). ``submission_format``
    is ``kit`` (``id,prediction,dummy_field``) or ``plain`` (``id,prediction``). ``write_reserve``
    seconds are kept for writing the outputs (default: 2% of the budget, at most
    30s). ``clock`` is the time source of the budget (tests pass a fake one).

    Data-aware merges (``compete_data``): a recipe whose method reads calibration
    statistics and that names no calibration data gets the ``validation`` task files
    as every model's data; its statistics are collected in a ``calibrate`` phase.
    ``adamerge`` (``AdaMergingSettings``) learns the recipe's task-vector weights on the
    unlabeled prompts of ``task_paths`` in a ``learn`` phase, which stops at
    ``learn_share`` of the budget with what it learned (``OUT/learned.yml``, then merged).
    Both count against the budget; stopped by it, they leave no partial output.

    A search space as ``recipe`` (ranges, choices or a mergekit-evolve ``genome:``; see
    ``mergesmith.search.space.is_search_space``) is searched first: ``search_share`` of the
    budget goes to ``mergesmith.search.search`` with the ``validation`` files as its fitness
    tasks (their multiple-choice rows; ``search_options``, a ``SearchOptions``, sets workers,
    optimizer, seed, ...), its outputs in ``OUT/search``. Its budget includes its own final
    steps; the best recipe it found (``OUT/search/best.yml``) is then merged and evaluated in
    what is left. ``compete.json`` records the search's summary under ``search``.

    Every argument, the output folder and every task file are checked first, and
    all their problems raised as one ``InputError``, before anything is merged.
    With ``isolate_merge=False`` the merge (and the statistics collection) runs in this
    process and cannot be stopped at the budget; it runs to its end.
    """
    from mergesmith.evaluate import compete_data as D
    from mergesmith.checks import prepare_output_dir, remove_if_empty, resolve_device
    from mergesmith.evaluate.model import load_model
    from mergesmith.evaluate.runner import Pacer, evaluate, metric_problems, settings_problems, unrun_result
    from mergesmith.evaluate.tasks import load_tasks

    problems: list[str] = []
    budget_s = 0.0
    try:
        budget_s = parse_budget(budget)
    except InputError as err:
        problems += err.problems
    problems += settings_problems(batch_size=batch_size, bootstrap=bootstrap, device=device, dtype=dtype)
    try:
        submission_header(submission_format)
    except InputError as err:
        problems += err.problems
    if write_reserve is not None and not (isinstance(write_reserve, (int, float)) and write_reserve >= 0):
        problems.append(f"write_reserve {write_reserve!r}: must be a number of seconds, at least 0")
    if not (isinstance(learn_share, (int, float)) and 0 < learn_share <= 1):
        problems.append(f"--learn-share {learn_share!r}: must be a fraction of the budget in (0, 1]")
    out = Path(out_dir)
    model_dir = out / "model"
    problems += output_problems_for(out, recipe, [*task_paths, *validation])
    data = D.DataPlan(D.PLAIN, recipe)
    searching = _is_space(recipe)
    search_share = DEFAULT_SEARCH_SHARE if search_share is None and searching else search_share
    if not searching:
        if search_options is not None or search_share is not None:
            problems.append(f"{recipe}: search options were given (--search-share, --workers, ...), but this is "
                            "a plain recipe, not a search space (no range:, choice: or genome:); leave them out "
                            "or mark what to search")
        try:
            data = D.plan_data(recipe, task_paths, validation, adamerge)
        except InputError as err:
            problems += err.problems
    if model_dir.exists() and not overwrite:
        problems.append(f"{model_dir}: already exists; choose another --out or pass --overwrite")
    start = clock()
    deadline = start + budget_s
    reserve = min(30.0, 0.02 * budget_s) if write_reserve is None else write_reserve
    result = CompeteResult(budget_s, notes=list(data.notes))
    device = resolve_device(device)
    merge_kwargs = {"device": device, "overwrite": overwrite}

    def phase(name: str, fn: Callable) -> tuple[Any, Phase]:
        t = clock()
        value = fn()
        record = Phase(name, clock() - t, DONE)
        result.phases.append(record)
        return value, record

    tasks: list = []
    try:
        tasks, _ = phase("load_tasks", lambda: load_tasks(task_paths, skip_bad_rows=skip_bad_rows, metric=metric))
    except InputError as err:
        problems += err.problems
    problems += metric_problems(tasks)
    if check_fn is None and merge_fn is None:
        check_fn = check_recipe
    if searching:  # the space's middle candidate is planned as a recipe: check_recipe's work, for a space
        (search_options, found), _ = phase("check_space", lambda: _search_setup(
            recipe, out, validation, adamerge, search_options, search_share, budget_s, overwrite, progress))
        problems += found
    if check_fn is not None and not searching:  # (a space's middle candidate was planned by its checks)
        # the recipe's problems join the others: one report, not two rounds
        try:
            phase("check_recipe", lambda: check_fn(data.recipe, model_dir, **merge_kwargs))
        except InputError as err:
            problems += err.problems
    if problems:
        raise InputError(list(dict.fromkeys(problems)))
    # One run per output folder: a second compete on the same --out stops here, at once.
    with OutputLock(out):
        created = prepare_output_dir(out)
        runner = run_merge_isolated if isolate_merge else run_merge_inline
        try:
            if searching:
                to_merge, status, detail = _search_first(recipe, out, phase, result, search_options,
                                                         start + min(max(search_share, 0.0), 1.0) * budget_s, clock,
                                                         overwrite)
            else:
                to_merge, status, detail = _before_merge(data, out, phase, isolate=isolate_merge, device=device,
                                                         clock=clock, deadline=deadline,
                                                         learn_deadline=start + learn_share * budget_s)
            if status == FAILED:  # its process died: a fault, as for the merge
                raise RuntimeError(detail)
            if status == DONE and clock() < deadline:
                (status, detail), merged = phase("merge", lambda: runner(merge_fn or default_merge, to_merge,
                                                                         model_dir, merge_kwargs, deadline - clock()))
            else:
                status, detail = SKIPPED, ("no time left for the merge" if status == DONE else
                                           f"not run: the {result.phases[-1].name} phase did not finish")
                merged = Phase("merge", 0.0, status, detail)
                result.phases.append(merged)
        except BaseException:
            if created:  # the merge failed or was interrupted: no empty output folder stays behind
                remove_if_empty(out)
            raise
        if status == DONE and clock() >= deadline and not detail:
            # the model is complete and stays so: the budget ran out after it, not during it
            detail = "finished as the budget ran out"
        merged.status, merged.detail = status, detail
        if status == FAILED:
            raise RuntimeError(detail)
        evaluation = None
        if status == DONE and clock() < deadline - reserve:
            lm, _ = phase("load_model", lambda: load_model(str(model_dir), device=device, dtype=dtype))
            evaluation, evaluated = phase("evaluate", lambda: evaluate(
                lm.model, tasks, tokenizer=lm.tokenizer, batch_size=batch_size, max_length=lm.max_length,
                bootstrap=bootstrap, progress=progress, pacer=Pacer(deadline - reserve, clock=clock)))
            evaluation.model = str(model_dir)
            if not evaluation.complete:
                evaluated.status = STOPPED
                evaluated.detail = "stopped before a batch that would overrun the budget"
        else:
            reason = ("no time left after the merge" if status == DONE else "the merge did not run" if
                      status == SKIPPED else "the merge did not finish")
            result.phases.append(Phase("evaluate", 0.0, SKIPPED, reason))
            evaluation = unrun_result(tasks, str(model_dir), reason)
        result.evaluation = evaluation

        def write() -> None:
            evaluation.save(out)
            result.not_scored = {k: len(v) for k, v in evaluation.not_run.items()}
            result.submissions = write_submissions(tasks, evaluation.predictions, out,
                                                   submission_format=submission_format)

        phase("write", write)
        (out / "compete.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
        return result


def _is_space(recipe: Any) -> bool:
    from mergesmith.search.space import is_search_space, read_space_raw

    return is_search_space(read_space_raw(recipe))


def _search_setup(space: Any, out: Path, validation: Sequence[Union[str, Path]], adamerge: Any, options: Any,
                  share: Any, budget_s: float, overwrite: bool, progress: bool) -> tuple[Any, list[str]]:
    """The search's options as compete runs it, and every problem with searching ``space`` first."""
    from mergesmith.search.run import SearchOptions, search_problems

    problems: list[str] = []
    if not validation:
        problems.append(f"{space}: is a search space (it has range:, choice: or genome:), and its candidates are "
                        "scored on validation tasks: pass --validation FILES (the competition's labelled "
                        "validation CSV), or give a plain recipe")
    if adamerge is not None:
        problems.append(f"{space}: --adamerge learns the weights of a plain recipe; a search space searches "
                        "them: drop --adamerge or give a plain recipe")
    if not (isinstance(share, (int, float)) and not isinstance(share, bool) and 0 < share < 1):
        problems.append(f"--search-share {share!r}: must be a fraction of the budget in (0, 1); the rest "
                        "merges the best recipe and predicts")
        share = 0.5
    folder = out / SEARCH_DIR
    if folder.exists() and not overwrite:
        problems.append(f"{folder}: already exists (an earlier search); choose another --out or pass "
                        "--overwrite, which replaces it")
    options = dataclasses.replace(options or SearchOptions(progress=progress), resume=False, save_model=False,
                                  tasks=[str(v) for v in validation], test_tasks=[])
    # The options' own checks need a budget; the search's real one is set when it starts.
    options.budget_s = share * budget_s if budget_s > 0 else 1.0
    # (without --validation, the space's own problems are still reported, in the same round)
    problems += [p for p in search_problems(space, options) if not p.startswith("no validation tasks")]
    return options, problems


def _search_first(space: Any, out: Path, phase: Callable, result: CompeteResult, options: Any,
                  search_deadline: float, clock: Callable[[], float], overwrite: bool) -> tuple[Any, str, str]:
    """The ``search`` phase: search the space until ``search_deadline``; returns (the best recipe found,
    status, detail). The search stops itself, final steps included, inside its share."""
    from mergesmith.search.run import search

    folder = out / SEARCH_DIR
    left = search_deadline - clock()
    if left <= 0:
        result.phases.append(Phase("search", 0.0, SKIPPED, "no time left for the search"))
        return None, SKIPPED, "no time left for the search"
    if folder.exists() and overwrite:  # checked up front: only an earlier compete's search is replaced
        shutil.rmtree(folder)
    options = dataclasses.replace(options, budget_s=left)
    found, record = phase("search", lambda: search(space, folder, options))
    s = found.summary
    best_recipe = folder / "best.yml"
    result.search = {
        "out": str(folder), "candidates": found.candidates,
        "best_fitness": found.best["fitness"] if found.best else None,
        "best_recipe": str(best_recipe) if found.best else None,
        "seconds": found.seconds, "budget_s": round(left, 3), "within_budget": s.get("within_budget"),
        "stop_reason": s.get("stop_reason"), "optimizer": options.optimizer, "seed": options.seed,
        "workers": options.workers, "fitness": options.fitness,
        "full_validation": ((s.get("final") or {}).get("validation") or {}).get("macro"),
        "throughput": s.get("throughput"), "notes": s.get("notes") or []}
    result.notes += [f"search: {n}" for n in s.get("notes") or []]
    if found.best is None:
        record.status, record.detail = STOPPED, "no candidate was scored within the search's share of the budget"
        return None, STOPPED, record.detail
    record.detail = (f"{found.candidates} candidates, best fitness {found.best['fitness']:.4f} on the validation "
                     f"subsample; wrote {best_recipe}")
    return str(best_recipe), DONE, record.detail


def _before_merge(data: Any, out: Path, phase: Callable, *, isolate: bool, device: str,
                  clock: Callable[[], float], deadline: float, learn_deadline: float) -> tuple[Any, str, str]:
    """The ``calibrate`` or ``learn`` phase a data-aware recipe needs; returns (the recipe to merge,
    status, detail). Stopped at the budget, a phase's partial output is removed (``compete_data.clean_after``)."""
    from mergesmith.evaluate import compete_data as D

    if data.kind == D.PLAIN:
        return data.recipe, DONE, ""

    def cleanup(pid: int) -> None:
        D.clean_after(data, out, pid)

    def run(fn: Callable, args: tuple, kwargs: dict, what: str) -> tuple[str, str, Any]:
        if isolate:
            return run_isolated(fn, args, kwargs, deadline - clock(), what=what, cleanup=cleanup)
        try:
            return DONE, "", fn(*args, **kwargs)
        except BaseException:
            cleanup(os.getpid())
            raise

    if data.kind == D.CALIBRATE:
        def calibrate() -> tuple[str, str, Any]:
            missing = D.missing_statistics(data.recipe)
            if not missing:
                return DONE, "every statistic was cached", []
            status, detail, computed = run(D.calibrate_recipe, (data.recipe,), {"device": device},
                                           "statistics collection")
            return status, detail or f"computed {len(computed or missing)}: {', '.join(computed or missing)}", computed

        (status, detail, _), record = phase("calibrate", calibrate)
        record.status, record.detail = status, detail
        return data.recipe, status, detail
    learned = out / D.LEARNED_RECIPE
    for old in (learned, learned.with_suffix(".json")):  # an old learned recipe is never merged by mistake
        if old.exists():
            old.unlink()
    if isolate:  # the child stops itself at the learning share: a moment on the shared monotonic clock
        stop: Any = D.Deadline(time.monotonic() + max(0.0, learn_deadline - clock()))
    else:
        stop = lambda: clock() >= learn_deadline  # noqa: E731 (the budget's clock, which tests fake)
    (status, detail, info), record = phase("learn", lambda: run(
        D.learn_recipe, (data.recipe, data.learn_files, learned, data.settings, stop), {}, "AdaMerging learning"))
    if status == DONE:
        steps, of = info["steps"], info["of"]
        detail = f"AdaMerging: {steps} of {of} steps; wrote {learned}"
        if steps < of:
            detail += (" (stopped at its share of the budget" +
                       ("; no step fitted, so the weights are the initial ones" if steps == 0 else "") + ")")
    record.status, record.detail = status, detail
    return str(learned), status, detail
