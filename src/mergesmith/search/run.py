"""``search(...)``: propose recipes, score them on workers, inside one wall-clock budget.

The flow, all of it counted against ``budget_s``:

1. check everything (space, tasks, options, output folder, extras) and report every problem at once;
2. draw the fitness subsample (seeded, stratified) of the validation tasks;
3. start the workers (in-process, or Ray actors);
4. ask the optimizer for a generation, score its candidates as workers free up, tell it the
   results, save its state; a candidate is started only if its expected time, plus what the
   final phase needs, still fits before the deadline;
5. with ``rerank`` K: evaluate the K candidates of highest fitness on the full validation tasks
   and keep the one that scores best there (the subsample's winner overstates itself: winner's curse);
6. write ``best.yml``, evaluate the best recipe on the full validation tasks (and the test
   tasks), merge it to ``DIR/model`` if that still fits, and draw the plots.

Every scored candidate is one line of ``trace.jsonl``, appended and flushed as it
arrives; with the optimizer's state (``optimizer.json``, saved after every generation; with
IRT fitness also ``irt.json``) that is what ``resume`` continues from. Both are JSON in a
format of ours (``optimizers.py``), never pickles of library objects.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from mergesmith.errors import InputError
from mergesmith.extras import extra_problems
from mergesmith.search.fitness import evaluation_summary, stratified_subsample, weighted_fitness
from mergesmith.search.optimizers import (OPTIMIZERS, default_batch, load_optimizer, make_optimizer, read_state,
                                          save_optimizer, write_state)
from mergesmith.search.space import SearchSpace, load_space, space_problems

TRACE = "trace.jsonl"
STATE = "optimizer.json"
IRT_STATE = "irt.json"
# What mergesmith wrote before its states were JSON: pickles, which a resume no longer reads.
PICKLED_STATES = ("optimizer.pkl", "irt.pkl")
SETTINGS = "search.json"
DEFAULT_PER_TASK = 40
# Time kept back for writing best.yml, the summary and the plots.
WRITE_MARGIN_S = 2.0
# Stopping the Ray actors and the local cluster (measured 1.2 s on the project machine).
RAY_CLOSE_S = 2.0


@dataclass
class SearchOptions:
    tasks: list[str] = field(default_factory=list)  # validation task files; default: the space's tasks
    test_tasks: list[str] = field(default_factory=list)
    budget_s: float = 1200.0
    workers: int = 1
    ray_address: Optional[str] = None
    resume: bool = False
    optimizer: str = "cma"
    seed: int = 0
    per_task: Optional[int] = None  # fitness items per task; default: the space's limit, else 40
    population: Optional[int] = None  # candidates per generation
    threads: Optional[int] = None  # torch threads per worker
    batch_size: int = 16
    save_model: bool = True
    progress: bool = True
    fitness: str = "subsample"  # or "irt": estimate full-validation accuracy from the subsample (irt.py)
    irt_calibration: int = 8  # candidates evaluated in full before the items are fitted
    irt_holdout_every: int = 5  # then every n-th candidate is evaluated in full to measure the error
    rerank: int = 0  # the top K candidates by fitness are evaluated in full at the end, and the best kept
    references: list[str] = field(default_factory=list)  # models evaluated in full beside the search (references.py)


@dataclass
class SearchResult:
    out_dir: Path
    best: Optional[dict[str, Any]]  # the best trace record
    candidates: int
    seconds: float
    summary: dict[str, Any]


def search(space_path: Union[str, Path], out_dir: Union[str, Path], options: Optional[SearchOptions] = None,
           **kwargs: Any) -> SearchResult:
    """Search the space for the recipe with the best fitness; see the module docstring."""
    started = time.monotonic()
    # A copy: the caller's options object is left as it was (replace also rejects unknown names).
    options = dataclasses.replace(options or SearchOptions(), **kwargs)
    out = Path(out_dir)
    space, tasks, test_tasks, weights = _check(space_path, out, options)
    deadline = started + options.budget_s  # the checks count against the budget too
    per_task = options.per_task or space.limit or DEFAULT_PER_TASK
    fitness_tasks = stratified_subsample(tasks, per_task, options.seed)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"space_sha256": _sha(space_path), "space": str(space_path), "tasks": [t.source for t in tasks],
                "optimizer": options.optimizer, "seed": options.seed, "per_task": per_task,
                "fitness": options.fitness,
                "genes": [g.name for g in space.genes]}
    if options.references:
        settings["references"] = list(options.references)
    records, optimizer, elapsed_before = _start_or_resume(out, settings, space, options, len(tasks))
    log = _Log(options.progress)
    for note in space.notes:
        log(f"note: {note}")
    log(f"search: {space.dim} genes, {options.optimizer}, batch {optimizer.batch}, "
        f"{sum(len(t.items) for t in fitness_tasks)} fitness items over {len(tasks)} tasks, "
        f"{options.workers} worker(s), budget {options.budget_s:.0f} s")

    irt = _irt_state(out, tasks, fitness_tasks, weights, options) if options.fitness == "irt" else None
    from mergesmith.search.references import evaluate_references, public
    from mergesmith.search.workers import LocalPool, make_pool

    references: list[dict] = []
    timings: dict[str, float] = {}
    if options.references:
        refs_start = time.monotonic()
        references = evaluate_references(options.references, tasks, test_tasks, weights, deadline, out,
                                         options.batch_size, log)
        timings["references_s"] = time.monotonic() - refs_start

    pool_start = time.monotonic()
    pool = make_pool(fitness_tasks, options.workers, options.ray_address, options.threads, options.batch_size,
                     full_tasks=tasks if irt is not None or options.rerank else None)
    timings["start_workers_s"] = time.monotonic() - pool_start
    validation_items = sum(len(t.items) for t in tasks)
    full_items = validation_items + sum(len(t.items) for t in test_tasks)
    stop_reason = "budget"
    trace = (out / TRACE).open("a")
    before = len(records)
    loop_start = time.monotonic()
    try:
        if irt is not None and not irt.responses:
            for reference in references:  # --reference models calibrate the item fit too
                if reference.get("answers"):
                    irt.add_reference(reference)
            _evaluate_references(space, pool, irt, deadline, out, log)
            timings["irt_references_s"] = time.monotonic() - loop_start
            loop_start = time.monotonic()
        stop_reason = _loop(space, optimizer, pool, records, trace, out, weights, deadline, full_items,
                            validation_items, options, started, elapsed_before, log, irt)
    except BaseException:
        pool.close()
        raise
    finally:
        trace.close()
        timings["loop_s"] = time.monotonic() - loop_start
    search_s = time.monotonic() - started
    # Ray's shutdown is part of the budget: the final phase leaves room for it.
    close_s = 0.0 if isinstance(pool, LocalPool) else RAY_CLOSE_S
    try:
        summary = _finish(space, records, out, tasks, test_tasks, weights, deadline - close_s, options, pool, log)
    finally:
        closing = time.monotonic()
        pool.close()
        timings["close_workers_s"] = time.monotonic() - closing
    summary["throughput"] = _throughput(records[before:], timings["loop_s"], options.workers)
    if irt is not None:
        summary["irt"] = irt.report()
    if references:
        summary["references"] = public(references)
    summary.update(stop_reason=stop_reason, search_s=round(search_s, 3), budget_s=options.budget_s,
                   candidates=len(records), notes=space.notes, **{k: round(v, 3) for k, v in timings.items()})
    summary["seconds"] = round(time.monotonic() - started, 3)
    summary["within_budget"] = summary["seconds"] <= options.budget_s
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    best = next((r for r in records if r["index"] == summary["best"]["index"]), None) if summary["best"] else None
    log(f"done: {len(records)} candidates in {summary['seconds']:.1f} s (budget {options.budget_s:.0f} s); "
        f"best fitness {best['fitness']:.4f}" if best else "done: no candidate was scored")
    return SearchResult(out, best, len(records), summary["seconds"], summary)


# ----------------------------------------------------------------------------- checks and resume


def search_problems(space_path: Union[str, Path], options: SearchOptions) -> list[str]:
    """Every problem ``search`` would report before starting (space, tasks, options, extras), without
    touching an output folder: for callers that check all their inputs at once (``mergesmith compete``)."""
    try:
        _check(space_path, None, dataclasses.replace(options))
    except InputError as err:
        return list(err.problems)
    return []


def _check(space_path: Union[str, Path], out: Optional[Path], options: SearchOptions):
    """Everything that can be checked before work starts, reported together (``out`` None: not the folder)."""
    from mergesmith.evaluate import load_tasks
    from mergesmith.units import parse_budget

    problems: list[str] = []
    try:
        options.budget_s = parse_budget(options.budget_s)
    except InputError as err:
        problems += err.problems
    if options.optimizer not in OPTIMIZERS:
        problems.append(f"--optimizer {options.optimizer!r} must be one of {', '.join(OPTIMIZERS)}")
    if not isinstance(options.workers, int) or options.workers < 1:
        problems.append(f"--workers {options.workers!r} must be at least 1")
    for flag, value in (("--per-task", options.per_task), ("--population", options.population),
                        ("--threads", options.threads)):
        if value is not None and value < 1:
            problems.append(f"{flag} {value} must be at least 1")
    if not isinstance(options.rerank, int) or isinstance(options.rerank, bool) or options.rerank < 0:
        problems.append(f"--rerank {options.rerank!r} must be a whole number, at least 0 (0: no reranking)")
    if options.fitness not in ("subsample", "irt"):
        problems.append(f"--fitness {options.fitness!r} must be subsample or irt")
    for flag, value in (("--irt-calibration", options.irt_calibration),
                        ("--irt-holdout-every", options.irt_holdout_every)):
        if value < 1:
            problems.append(f"{flag} {value} must be at least 1")
    needed = {"cma": ["cma"], "nsga2": ["optuna"]}.get(options.optimizer, [])
    if options.workers > 1 or options.ray_address:
        needed.append("ray")
    if needed:
        problems += extra_problems(f"mergesmith search ({', '.join(needed)})", "search", needed)
    space: Optional[SearchSpace] = None
    try:
        space = load_space(space_path)
        problems += space_problems(space)
    except InputError as err:
        problems += err.problems
    names = list(options.tasks) or ([t.name for t in space.tasks] if space else [])
    weights = {}
    tasks: list = []
    test_tasks: list = []
    if not names and space is not None:
        problems.append("no validation tasks: pass --tasks FILE... or list tasks: in the space")
    else:
        by_name = {t.name: t.weight for t in (space.tasks if space and not options.tasks else [])}
        for name in names:
            try:
                loaded = load_tasks([name])
            except InputError as err:
                problems += err.problems
                continue
            tasks += loaded
            weights.update({task.name: by_name.get(name, 1.0) for task in loaded})
    if options.test_tasks:
        try:
            test_tasks = load_tasks(options.test_tasks)
        except InputError as err:
            problems += [f"--test-tasks: {p}" for p in err.problems]
    if tasks and not any(t.type == "multiple_choice" for t in tasks):
        problems.append("the validation tasks have no multiple-choice task; fitness is multiple-choice accuracy")
    if out is None:
        pass
    elif out.exists() and not out.is_dir():
        problems.append(f"{out}: exists and is not a folder; choose another --out")
    elif (out / TRACE).exists() and not options.resume:
        problems.append(f"{out}: already holds a search ({TRACE}); pass --resume to continue it or choose "
                        "another --out")
    elif options.resume and not (out / TRACE).exists():
        problems.append(f"{out}: --resume, but there is no {TRACE} to continue from; drop --resume")
    elif options.resume and any((out / name).exists() for name in PICKLED_STATES):
        pickled = ", ".join(name for name in PICKLED_STATES if (out / name).exists())
        problems.append(f"{out}: --resume, but it holds {pickled}, search state that an older mergesmith "
                        "pickled and this version no longer reads (it keeps its state as JSON); start a new --out "
                        f"(the old {TRACE} keeps its candidates)")
    if options.references:
        from mergesmith.search.references import reference_problems

        problems += reference_problems(list(options.references))
    if problems:
        raise InputError(problems)
    assert space is not None
    # Only multiple-choice tasks score fitness; generation tasks would cost much and say little here.
    dropped = [t.name for t in tasks if t.type != "multiple_choice"]
    if dropped:
        space.notes.append(f"{', '.join(dropped)}: generation items are left out of the fitness "
                           "(multiple-choice accuracy) and of the final validation evaluation")
    tasks = [t for t in tasks if t.type == "multiple_choice"]
    weights = {t.name: weights[t.name] for t in tasks}
    return space, tasks, test_tasks, weights


def _start_or_resume(out: Path, settings: dict, space: SearchSpace, options: SearchOptions, n_tasks: int):
    records: list[dict] = []
    elapsed_before = 0.0
    state = out / STATE
    if options.resume:
        saved = json.loads((out / SETTINGS).read_text()) if (out / SETTINGS).is_file() else {}
        changed = [k for k in ("space_sha256", "tasks", "optimizer", "seed", "per_task", "fitness", "genes",
                               "references")
                   if saved.get(k) != settings.get(k)]
        if changed:
            raise InputError(f"{out}: --resume, but {', '.join(changed)} differ from the interrupted search's "
                             f"({SETTINGS}); resume with the same space, tasks and options, or start a new --out")
        lines = (out / TRACE).read_text().splitlines()
        for line in lines:
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut by a killed run
                    continue
        if len(records) != len(lines):  # rewrite without the cut line, so the trace stays valid JSON lines
            tmp = out / (TRACE + ".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
            tmp.replace(out / TRACE)
        elapsed_before = max((r.get("t", 0.0) for r in records), default=0.0)
        if state.is_file():
            return records, load_optimizer(state), elapsed_before
    (out / SETTINGS).write_text(json.dumps(settings, indent=2) + "\n")
    batch = options.population or default_batch(options.optimizer, space.dim, options.workers)
    optimizer = make_optimizer(options.optimizer, space.dim, seed=options.seed, batch=batch, n_objectives=n_tasks)
    return records, optimizer, elapsed_before


# ----------------------------------------------------------------------------- the loop


def _loop(space: SearchSpace, optimizer: Any, pool: Any, records: list[dict], trace: Any, out: Path,
          weights: dict[str, float], deadline: float, full_items: int, validation_items: int,
          options: SearchOptions, started: float, elapsed_before: float, log: "_Log", irt: Any = None) -> str:
    """Generations until the budget (less the final phase's reserve) runs out; returns why it stopped."""
    import numpy as np

    from mergesmith.search.workers import LocalPool

    driver_builds = not isinstance(pool, LocalPool)  # then the Ray cluster's shutdown counts too
    while True:
        generation = optimizer.generation
        us = optimizer.ask()
        batch = [(u, space.decode(u)) for u in us]
        results: dict[int, dict] = {}
        queue = list(range(len(batch)))
        while len(results) < len(batch):
            reserve = (_final_reserve(records, full_items, options.save_model)
                       + _rerank_reserve(records, options.rerank, pool.size, validation_items)
                       + (RAY_CLOSE_S if driver_builds else 0.0))
            while queue and pool.free() and _fits(records, reserve, deadline):
                k = queue.pop(0)
                full = irt is not None and irt.wants_full(len(records) + pool.in_flight())
                pool.submit(k, space.recipe(batch[k][1]), full)
            if not pool.in_flight():
                return "budget"
            # Past the deadline, a result already back is still taken (wait(0)), never waited for.
            result = pool.wait(max(deadline - reserve - time.monotonic(), 0.0))
            if result is None:
                return "budget"
            k = result["index"]
            u, values = batch[k]
            record = _record(len(records), generation, optimizer.name, u, values, result, weights,
                             time.monotonic() - started + elapsed_before, irt)
            records.append(record)
            results[k] = record
            trace.write(json.dumps(record) + "\n")
            trace.flush()
            best = _best(records)
            log(f"[{record['index']}] gen {generation} fitness {record['fitness']:.4f} "
                f"(merge {record['merge_s']:.2f} s, eval {record['eval_s']:.2f} s); best {best['fitness']:.4f}")
        objectives = [results[k]["objectives"] for k in range(len(batch))]
        optimizer.tell([np.asarray(u) for u, _ in batch], objectives)
        save_optimizer(optimizer, out / STATE)
        if irt is not None:
            write_state(out / IRT_STATE, irt.state())


def _record(index: int, generation: int, optimizer: str, u: Any, values: dict, result: dict,
            weights: dict[str, float], t: float, irt: Any = None) -> dict:
    scores = result.get("scores") or {}
    fitness = weighted_fitness(scores, weights) if result["status"] == "ok" else 0.0
    extra: dict[str, Any] = {}
    if irt is not None and result["status"] == "ok":
        extra = irt.score(result)
        scores, fitness = extra.pop("scores"), extra.pop("fitness")
    return {"index": index, "generation": generation, "optimizer": optimizer, "status": result["status"],
            "fitness": fitness, "scores": scores, **extra,
            "objectives": [scores.get(name) or 0.0 for name in weights] if optimizer == "nsga2" else [fitness],
            "params": values, "u": [float(x) for x in u], "merge_s": round(result["merge_s"], 4),
            "eval_s": round(result["eval_s"], 4), "setup_s": round(result.get("setup_s", 0.0), 4),
            "items": result.get("items", 0), "t": round(t, 3), "worker": result.get("worker"),
            **({"error": result["error"]} if "error" in result else {})}


def _irt_state(out: Path, tasks: list, fitness_tasks: list, weights: dict[str, float], options: SearchOptions):
    from mergesmith.search.irt import IRTFitness

    if options.resume and (out / IRT_STATE).is_file():
        return IRTFitness.from_state(read_state(out / IRT_STATE))
    keys = [(t.name, item.position) for t in tasks for item in t.items]
    anchors = {(t.name, item.position) for t in fitness_tasks for item in t.items}
    return IRTFitness(keys, anchors, weights, options.irt_calibration, options.irt_holdout_every, seed=options.seed)


def _evaluate_references(space: SearchSpace, pool: Any, irt: Any, deadline: float, out: Path, log: "_Log") -> None:
    """Every model the space names (base, experts), evaluated in full: the IRT fit's first answers."""
    refs = space.model_refs()
    queue = list(range(len(refs)))
    pending = 0
    while queue or pending:
        while queue and pool.free():
            k = queue.pop(0)
            pool.submit(k, {"merge_method": "linear", "dtype": "float32",
                            "models": [{"model": refs[k], "parameters": {"weight": 1.0}}]}, True)
            pending += 1
        result = pool.wait(max(deadline - time.monotonic(), 0.0))
        if result is None:
            return
        pending -= 1
        if result["status"] == "ok":
            irt.add_reference(result)
            log(f"IRT reference {refs[result['index']]}: full validation "
                f"{statistics.mean(v for v in result['scores'].values() if v is not None):.4f}")
    write_state(out / IRT_STATE, irt.state())


def _throughput(records: list[dict], loop_s: float, workers: int) -> dict[str, Any]:
    """Candidates per minute of this run's search loop, and how the workers' time was spent:
    merging, evaluating, building their resident model once, and waiting (idle, or a candidate cut
    off by the deadline)."""
    capacity = max(loop_s, 1e-9) * workers
    merge = sum(r["merge_s"] for r in records)
    evaluate = sum(r["eval_s"] for r in records)
    setup = sum(r.get("setup_s", 0.0) for r in records)
    return {"candidates": len(records), "loop_s": round(loop_s, 3),
            "candidates_per_min": round(60 * len(records) / max(loop_s, 1e-9), 2),
            "merge_share": round(merge / capacity, 3), "eval_share": round(evaluate / capacity, 3),
            "setup_share": round(setup / capacity, 3),
            "wait_share": round(max(0.0, 1 - (merge + evaluate + setup) / capacity), 3)}


def _candidate_s(records: list[dict]) -> float:
    recent = [r["merge_s"] + r["eval_s"] for r in records[-20:]]
    return statistics.median(recent) if recent else 0.0


def _fits(records: list[dict], reserve: float, deadline: float) -> bool:
    return time.monotonic() + _candidate_s(records) + reserve <= deadline


def _final_reserve(records: list[dict], full_items: int, save_model: bool) -> float:
    """Seconds the final phase needs: an in-memory merge that reads every input (as a worker's first
    candidate did), the full evaluation at the recent rate per item (a median: a worker's first
    evaluation also warms up, and would make the reserve swallow a short budget) with a 1.2 safety
    factor, a merge to disk, and the writes. The final evaluation runs on a worker, whose model and
    inputs are warm."""
    ok = [r for r in records if r["status"] == "ok"]
    if not ok:
        return WRITE_MARGIN_S
    merge = max(r["merge_s"] for r in ok)
    return merge * (3 if save_model else 1) + 1.2 * _item_s(ok[-20:]) * full_items + WRITE_MARGIN_S


def _item_s(recent: list[dict]) -> float:
    """Evaluation seconds per item: the median over ``recent`` scored candidates."""
    return statistics.median(r["eval_s"] / max(r.get("items", 1), 1) for r in recent)


def _full_evaluation_s(records: list[dict], items: int) -> float:
    """One candidate merged into a warm worker and evaluated on ``items`` items: the recent median
    merge, and the recent median rate per item with the final reserve's 1.2 safety factor."""
    ok = [r for r in records if r["status"] == "ok"][-20:]
    if not ok:
        return 0.0
    return statistics.median(r["merge_s"] for r in ok) + 1.2 * _item_s(ok) * items


def _rerank_reserve(records: list[dict], k: int, workers: int, validation_items: int) -> float:
    """Seconds the rerank needs: its full evaluations (no more than the candidates scored so far),
    spread over the workers in rounds."""
    if k <= 0:
        return 0.0
    # The scored count, not the distinct parameter sets: an upper bound that costs no sort per candidate.
    n = min(k, sum(1 for r in records if r["status"] == "ok"))
    return math.ceil(n / max(workers, 1)) * _full_evaluation_s(records, validation_items)


def _best(records: list[dict]) -> Optional[dict]:
    ok = [r for r in records if r["status"] == "ok"]
    return max(ok, key=lambda r: (r["fitness"], -r["index"])) if ok else None


def pareto_front(records: list[dict]) -> list[dict]:
    """The scored candidates no other candidate matches or beats on every task and beats on one."""
    ok = [r for r in records if r["status"] == "ok" and r["scores"]]
    names = list(ok[0]["scores"]) if ok else []

    def vec(r: dict) -> list[float]:
        return [r["scores"].get(n) or 0.0 for n in names]

    front = []
    for r in ok:
        v = vec(r)
        dominated = any(all(a >= b for a, b in zip(vec(o), v)) and any(a > b for a, b in zip(vec(o), v))
                        for o in ok if o is not r)
        if not dominated:
            front.append(r)
    return front


# ----------------------------------------------------------------------------- the final phase


def _top_candidates(records: list[dict], k: int) -> list[dict]:
    """The ``k`` scored candidates of highest fitness (ties: the lower index), one per parameter set."""
    ok = sorted((r for r in records if r["status"] == "ok"), key=lambda r: (-r["fitness"], r["index"]))
    top: list[dict] = []
    seen: set[str] = set()
    for r in ok:
        key = json.dumps(r["params"], sort_keys=True)
        if key not in seen:
            seen.add(key)
            top.append(r)
            if len(top) == k:
                break
    return top


def _rerank(space: SearchSpace, records: list[dict], tasks: list, weights: dict[str, float], k: int, pool: Any,
            deadline: float, log: "_Log") -> tuple[Optional[dict], dict[str, Any]]:
    """Re-rank the top ``k`` candidates by fitness on the full validation tasks (the same task weights) and
    return the best of them with the summary's ``rerank`` block.

    Over thousands of candidates, the highest subsample fitness is partly luck: the winner's score
    overstates its full-validation accuracy (the winner's curse). Choosing among a short list by a
    second, larger measurement that took no part in the selection shrinks that bias. Ties: the higher
    subsample fitness, then the lower index. Evaluations start only while one more still fits before
    ``deadline``; the block's ``note`` then says how many fitted (the others' ``full_validation`` is
    None). A candidate the IRT fitness already evaluated in full keeps that score and costs nothing.
    """
    top = _top_candidates(records, k)
    full: dict[int, float] = {r["index"]: r["full"] for r in top if r.get("full") is not None}
    # Negative ids: the pool may still hold the loop's last candidates (ids 0, 1, ...), whose late
    # results must not be taken for these.
    queue = [r for r in top if r["index"] not in full]
    pending: set[int] = set()
    each_s = _full_evaluation_s(records, sum(len(t.items) for t in tasks))
    while True:
        while queue and pool.free() and time.monotonic() + each_s <= deadline:
            r = queue.pop(0)
            pool.submit(-1 - r["index"], space.recipe(r["params"]), True)
            pending.add(r["index"])
        # Nothing of ours running: wait only for a busy worker to free up, and only if one more still fits.
        if not pending and not (queue and pool.in_flight() and time.monotonic() + each_s <= deadline):
            break
        result = pool.wait(max(deadline - time.monotonic(), 0.0))
        if result is None:
            break
        index = -1 - result["index"]
        if index not in pending:
            continue  # a loop candidate that finished late
        pending.discard(index)
        if result["status"] == "ok":
            full[index] = weighted_fitness(result["scores"], weights)
            log(f"rerank [{index}]: full validation {full[index]:.4f}")
    by_fitness = top[0] if top else None
    scored = [r for r in top if r["index"] in full]
    chosen = max(scored, key=lambda r: (full[r["index"]], r["fitness"], -r["index"])) if scored else by_fitness
    block: dict[str, Any] = {
        "k": k, "candidates": [{"index": r["index"], "fitness": r["fitness"], "full_validation": full.get(r["index"])}
                               for r in top],
        "chosen": chosen["index"] if chosen else None, "by_fitness": by_fitness["index"] if by_fitness else None}
    if len(scored) < len(top):
        block["note"] = (f"the budget allowed {len(scored)} of {len(top)} full evaluations; the others were not "
                         "reranked (full_validation null)")
        log(f"note: rerank: {block['note']}")
    return chosen, block



def _finish(space: SearchSpace, records: list[dict], out: Path, tasks: list, test_tasks: list,
            weights: dict[str, float], deadline: float, options: SearchOptions, pool: Any, log: "_Log") -> dict:
    best = _best(records)
    summary: dict[str, Any] = {"optimizer": options.optimizer, "seed": options.seed, "workers": options.workers}
    if best is None:
        summary["best"] = None
        return summary
    if options.rerank > 0:
        # What the final evaluation, the model write and the plots need is kept back from the rerank.
        full_items = sum(len(t.items) for t in tasks) + sum(len(t.items) for t in test_tasks)
        reserve = _final_reserve(records, full_items, options.save_model)
        best, summary["rerank"] = _rerank(space, records, tasks, weights, options.rerank, pool, deadline - reserve,
                                          log)
    recipe = space.recipe(best["params"])
    (out / "best.yml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    summary["best"] = {"index": best["index"], "fitness": best["fitness"], "scores": best["scores"],
                       "params": best["params"]}
    if options.optimizer == "nsga2":
        summary["pareto"] = [r["index"] for r in pareto_front(records)]
    ok = [r for r in records if r["status"] == "ok"]

    # Full evaluation of the best recipe, in memory on a worker: it never costs a write and a reload.
    final: dict[str, Any] = {}
    merge = max((r["merge_s"] for r in ok), default=0.0)
    done = None
    # The merged model's write is kept out of the final evaluation's time: the evaluation may end
    # partial (items not_run), the model should not go missing.
    keep = _model_write_s(ok) if options.save_model else 0.0
    left = deadline - WRITE_MARGIN_S - keep - time.monotonic()
    if left > merge:
        done = pool.final(recipe, [("validation", tasks), ("test", test_tasks)], left)
    if done is None:
        final["skipped"] = "no time left in the budget for the final evaluation"
    else:
        merge_s = done["merge_s"]
        for label, result in done["results"].items():
            result.save(out / "final" / label)
            final[label] = evaluation_summary(result, weights if label == "validation" else None)
        final["merge_s"] = round(merge_s, 3)
    summary["final"] = final
    if "validation" in final and final["validation"]["macro"] is not None:
        summary["fitness_minus_full_validation"] = best["fitness"] - (final["validation"]["weighted"] or 0.0)
    if "test" in final and final["test"]["macro"] is not None and "validation" in final:
        summary["validation_minus_test"] = (final["validation"]["macro"] or 0.0) - final["test"]["macro"]
    if options.save_model:
        summary["model"] = _save_model(out, recipe, ok, deadline, log)
    if time.monotonic() < deadline - WRITE_MARGIN_S / 2:
        _plots(records, out, options.optimizer == "nsga2", summary)
    else:
        summary["plots"] = "skipped: the budget ran out"
    return summary


def _save_model(out: Path, recipe: dict, ok: list[dict], deadline: float, log: "_Log") -> Optional[str]:
    """Merge the best recipe to ``DIR/model`` if the measured merge time still fits in the budget."""
    import mergesmith

    if time.monotonic() + _model_write_s(ok) + WRITE_MARGIN_S / 2 > deadline:
        log("note: no time left in the budget to write the merged model; run mergesmith merge best.yml")
        return None
    target = out / "model"
    mergesmith.merge(out / "best.yml", target, overwrite=True, progress=False)
    return str(target)


def _model_write_s(ok: list[dict]) -> float:
    """A merge to disk: reading every input and writing the output, taken as two in-memory merges."""
    return 2 * max((r["merge_s"] for r in ok), default=0.0)


def _plots(records: list[dict], out: Path, multi: bool, summary: dict) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        summary["plots"] = "matplotlib is not installed (pip install 'mergesmith[zoo]'): no plots"
        return
    ok = [r for r in records if r["status"] == "ok"]
    if not ok:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    best, running = [], -math.inf
    for r in ok:
        running = max(running, r["fitness"])
        best.append(running)
    for ax, xs, label in ((axes[0], [r["index"] for r in ok], "candidate"), (axes[1], [r["t"] for r in ok],
                                                                                "seconds")):
        ax.scatter(xs, [r["fitness"] for r in ok], s=12, alpha=0.6, label="candidate")
        ax.step(xs, best, where="post", color="C3", label="best so far")
        ax.set_xlabel(label)
        ax.set_ylabel("fitness (subsample accuracy)")
    axes[0].legend()
    fig.suptitle("search fitness over evaluations and time")
    fig.tight_layout()
    fig.savefig(out / "fitness.png", dpi=100)
    plt.close(fig)
    if multi:
        names = list(ok[0]["scores"])[:2]
        if len(names) == 2:
            front = pareto_front(records)
            fig, ax = plt.subplots(figsize=(5, 5))
            ax.scatter([r["scores"][names[0]] for r in ok], [r["scores"][names[1]] for r in ok], s=12, alpha=0.5,
                       label="candidates")
            pts = sorted((r["scores"][names[0]], r["scores"][names[1]]) for r in front)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color="C3", label="Pareto front")
            ax.set_xlabel(names[0])
            ax.set_ylabel(names[1])
            ax.legend()
            fig.tight_layout()
            fig.savefig(out / "pareto.png", dpi=100)
            plt.close(fig)


# ----------------------------------------------------------------------------- helpers


def _sha(path: Union[str, Path]) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class _Log:
    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __call__(self, text: str) -> None:
        if self.enabled:
            print(text, file=sys.stderr, flush=True)
