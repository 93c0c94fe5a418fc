"""``evaluate(model, tasks)``: generic over tasks, one pass per task, optionally inside a deadline."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import numpy as np
from tqdm.auto import tqdm

from mergesmith.checks import (at_least, choice_problems, device_problems, output_dir_problems, overwritten_inputs,
                               resolve_device)
from mergesmith.evaluate.generation import encode_gen, generate
from mergesmith.errors import InputError
from mergesmith.evaluate.metrics import (bootstrap_ci, generation_scores, macro_bootstrap_ci, mc_choices,
                                         rouge_available)
from mergesmith.evaluate.model import DTYPES, LoadedModel, load_model, model_path_problems
from mergesmith.evaluate.prompts import render_context
from mergesmith.evaluate.routed import Resident, oracle_problems, route_items
from mergesmith.evaluate.results import NOT_RUN, SCORED, UNLABELLED, EvalResult, Prediction, TaskResult
from mergesmith.evaluate.scoring import STRATEGIES, encode_mc, score_mc
from mergesmith.route.folder import is_routed_folder, read_routed
from mergesmith.evaluate.tasks import GEN_METRICS, MC_METRICS, MULTIPLE_CHOICE, Task, load_tasks


def settings_problems(*, batch_size: Any = 8, bootstrap: Any = 1000, max_length: Any = None, device: Any = None,
                      dtype: Any = "auto", strategy: Any = "shared_prefix") -> list[str]:
    """Every problem with the evaluation settings, found before a model is loaded.

    ``batch_size`` and ``max_length`` must be at least 1 and ``bootstrap`` at least 0
    (0: no confidence intervals); a zero or negative value would silently change
    what runs, so it is an error, not a default.
    """
    import torch

    problems = at_least("--batch-size", batch_size, 1, "items per forward pass")
    problems += at_least("--bootstrap", bootstrap, 0, "resamples for the confidence intervals; 0 for none")
    problems += at_least("--max-length", max_length, 1, "the context window in tokens; leave it out for the "
                         "model's own", optional=True)
    problems += device_problems(device)
    if not isinstance(dtype, torch.dtype) and dtype is not None:
        problems += choice_problems("--dtype", dtype, ["auto", *DTYPES])
    problems += choice_problems("strategy", strategy, STRATEGIES)
    return problems


RESULT_FILES = (r"results\.json", r"predictions\.jsonl")


def evaluate_output_problems(out: Union[str, Path], model: Any, tokenizer: Any = None,
                             task_paths: Iterable[Union[str, Path]] = ()) -> list[str]:
    """Why ``out`` cannot take an evaluation's outputs; nothing is created.

    An input is never written to: ``out`` may not be, contain or lie inside the
    evaluated model or tokenizer folder, nor hold a task file named like an output.
    """
    inputs = {label: path for label, path in (("model", model), ("tokenizer", tokenizer))
              if isinstance(path, (str, Path)) and Path(path).expanduser().exists()}
    return output_dir_problems(out, inputs) + overwritten_inputs(out, RESULT_FILES, task_paths)


def metric_problems(tasks: Iterable[Task]) -> list[str]:
    """A generation task scored by ROUGE-L needs the ``eval`` extra (rouge-score).

    Only tasks with labelled items count: an unlabelled one (a hidden test file) is
    predicted, never scored, so it runs without the package.
    """
    needing = [t for t in tasks if t.type != MULTIPLE_CHOICE and t.headline == "rougeL" and t.labelled]
    if not needing or rouge_available():
        return []
    csv_default = [t.name for t in needing if t.settings.metric == "rougeL" and t.source.lower().endswith(".csv")]
    why = (" (a competition CSV's generation rows are scored by ROUGE-L, the competition's metric)"
           if csv_default else "")
    return [f"task(s) {', '.join(t.name for t in needing)}: the metric is rougeL{why} but the rouge-score "
            "package is not installed: pip install 'mergesmith[eval]', or pass --gen-metric exact_match"]


class Pacer:
    """Keeps work inside a deadline: a batch runs only if its estimated time fits what is left.

    The estimate is the seconds per processed token measured so far for that kind of
    work (multiple choice or generation), times a safety factor. Before any
    measurement a batch runs if any time is left. Once a batch is refused,
    everything after it is refused too, so the unscored part is a clean tail.
    """

    def __init__(self, deadline: float, safety: float = 1.2, clock=time.monotonic):
        self.deadline, self.safety, self.clock = deadline, safety, clock
        self.seconds: dict[str, float] = {}
        self.work: dict[str, int] = {}
        self.stopped = False

    def rate(self, kind: str) -> Optional[float]:
        return self.seconds[kind] / self.work[kind] if self.work.get(kind) else None

    def allows(self, kind: str, work: int) -> bool:
        if self.stopped:
            return False
        left = self.deadline - self.clock()
        rate = self.rate(kind)
        estimate = 0.0 if rate is None else rate * work * self.safety
        if left <= 0 or estimate > left:
            self.stopped = True
        return not self.stopped

    def record(self, kind: str, work: int, seconds: float) -> None:
        self.seconds[kind] = self.seconds.get(kind, 0.0) + seconds
        self.work[kind] = self.work.get(kind, 0) + work


def _mc_predictions(task: Task, lm: LoadedModel, pacer, progress, batch_size: int, strategy: str):
    contexts = [render_context(task, item, lm.tokenizer) for item in task.items]
    requests = encode_mc(lm, task, task.items, contexts)
    scores = score_mc(lm, requests, batch_size=batch_size, strategy=strategy, pacer=pacer, progress=progress)
    preds = []
    for req, item in zip(requests, task.items):
        p = Prediction(task.name, item.id, item.type, None, status=NOT_RUN, answer=item.answer,
                       truncated_tokens=req.truncated, source=task.source, position=item.position)
        s = scores.get(req.index)
        if s is not None:
            chosen = mc_choices(s.loglikelihoods, s.num_tokens, item.choices)
            p.prediction, p.loglikelihoods, p.num_tokens, p.chosen = chosen[task.headline], s.loglikelihoods, \
                s.num_tokens, chosen
            p.status = SCORED if item.labelled else UNLABELLED
            if item.labelled:
                p.scores = {m: float(chosen[m] == item.answer) for m in MC_METRICS}
        preds.append(p)
    return preds, sum(r.truncated > 0 for r in requests), sum(r.merged for r in requests)


def _gen_predictions(task: Task, lm: LoadedModel, pacer, progress, batch_size: int, rouge: bool):
    contexts = [render_context(task, item, lm.tokenizer) for item in task.items]
    requests = encode_gen(lm, task, task.items, contexts)
    texts = generate(lm, task, requests, batch_size=batch_size, pacer=pacer, progress=progress)
    preds = []
    for req, item in zip(requests, task.items):
        p = Prediction(task.name, item.id, item.type, None, status=NOT_RUN, references=list(item.references),
                       truncated_tokens=req.truncated, source=task.source, position=item.position)
        if req.index in texts:
            p.prediction = texts[req.index]
            p.status = SCORED if item.labelled else UNLABELLED
            if item.labelled:
                p.scores = generation_scores(p.prediction, item.references, rouge=rouge)
        preds.append(p)
    return preds, sum(r.truncated > 0 for r in requests), 0


def _task_result(task: Task, preds: list[Prediction], truncated: int, merges: int, seconds: float,
                 resamples: int, seed: int) -> tuple[TaskResult, list[float]]:
    scored = [p for p in preds if p.status == SCORED]
    names = MC_METRICS if task.type == MULTIPLE_CHOICE else GEN_METRICS
    metrics = {m: float(np.mean([p.scores[m] for p in scored])) for m in names
               if scored and m in scored[0].scores}
    values = [p.scores[task.headline] for p in scored]
    result = TaskResult(
        name=task.name, type=task.type, source=task.source, headline=task.headline,
        score=metrics.get(task.headline), ci95=bootstrap_ci(values, resamples=resamples, seed=seed),
        metrics=metrics, n_items=len(preds), n_scored=len(scored),
        n_unlabelled=sum(p.status == UNLABELLED for p in preds), n_not_run=sum(p.status == NOT_RUN for p in preds),
        truncated=truncated, boundary_merges=merges, skipped=list(task.skipped), seconds=seconds)
    return result, values


def unrun_result(tasks: list[Task], model: str, reason: str = "") -> EvalResult:
    """The result of an evaluation that never ran (e.g. the budget went to the merge): all items not_run."""
    results, predictions = [], []
    for task in tasks:
        preds = [Prediction(task.name, i.id, i.type, None, status=NOT_RUN, answer=i.answer if i.choices else None,
                            references=list(i.references) if not i.choices else None, source=task.source,
                            position=i.position) for i in task.items]
        results.append(_task_result(task, preds, 0, 0, 0.0, 0, 0)[0])
        predictions.extend(preds)
    return EvalResult(model=model, tasks=results, predictions=predictions, macro=None, macro_ci95=None,
                      settings={"not_run_reason": reason} if reason else {})


def evaluate(model: Any, tasks: Union[Iterable[Task], Iterable[Union[str, Path]], str, Path], *,
             tokenizer: Any = None, batch_size: int = 8, device: Optional[str] = None, dtype: Any = "auto",
             max_length: Optional[int] = None, strategy: str = "shared_prefix", bootstrap: int = 1000,
             seed: int = 0, progress: bool = True, deadline: Optional[float] = None,
             pacer: Optional[Pacer] = None, resident: int = 1) -> EvalResult:
    """Evaluate a model (folder path, hub id, ``model+adapter``, routed model folder, or live
    ``transformers`` model) on tasks.

    ``tasks`` are ``Task`` objects or task file paths. ``deadline`` is a
    ``time.monotonic()`` instant: batches that would end after it are not run and
    their items are reported as ``not_run``. ``bootstrap`` is the number of
    resamples for the confidence intervals (0: none). A routed model folder
    (``mergesmith route``) answers each item with the expert its router picks,
    keeping at most ``resident`` models loaded at once.
    """
    started = time.monotonic()
    problems = settings_problems(batch_size=batch_size, bootstrap=bootstrap, max_length=max_length, device=device,
                                 dtype=dtype, strategy=strategy)
    problems += at_least("--resident", resident, 1, "models kept loaded at once")
    routed = None
    if isinstance(model, (str, Path)) and is_routed_folder(model):
        try:
            routed = read_routed(model)
        except InputError as err:
            problems += err.problems
    elif isinstance(model, (str, Path)):
        problems += model_path_problems(str(model))
    if isinstance(tasks, (str, Path)):
        tasks = [tasks]
    tasks = list(tasks)
    if tasks and not isinstance(tasks[0], Task):
        try:
            tasks = load_tasks(tasks)
        except InputError as err:
            problems += err.problems
            tasks = []
    elif not tasks:
        problems.append("no tasks to evaluate; give at least one task or task file")
    if routed is not None and tokenizer is not None:
        problems.append(f"{model}: a routed model folder runs each model with its own tokenizer; leave out "
                        "the tokenizer (--tokenizer)")
    if routed is not None and routed.kind == "oracle":
        problems += oracle_problems(routed, tasks)
    problems += metric_problems(tasks)
    if problems:
        raise InputError(problems)
    generation = [t for t in tasks if t.type != MULTIPLE_CHOICE]
    rouge = bool(generation) and rouge_available()
    if pacer is None and deadline is not None:
        pacer = Pacer(deadline)
    run = _TaskRun(pacer, batch_size, strategy, rouge)
    bar = tqdm(total=sum(len(t.items) for t in tasks), desc="evaluate", unit="item", disable=not progress)
    extra: dict[str, Any] = {}
    try:
        if routed is not None:
            lm, answered, extra = _answer_routed(routed, tasks, run, bar, device, dtype, max_length, resident,
                                                 tokenizer)
            name = str(routed.folder)
        else:
            lm = load_model(model, tokenizer, device=resolve_device(device), dtype=dtype, max_length=max_length)
            try:
                answered = [run(task, lm, bar) for task in tasks]
            finally:
                lm.restore()
            name = lm.name
    finally:
        bar.close()
    results, predictions, per_task_values = [], [], []
    for task, (preds, truncated, merges, seconds) in zip(tasks, answered):
        result, values = _task_result(task, preds, truncated, merges, seconds, bootstrap, seed)
        results.append(result)
        predictions.extend(preds)
        if result.score is not None:
            per_task_values.append(values)
    scores = [r.score for r in results if r.score is not None]
    settings = {"batch_size": batch_size, "device": str(lm.device), "dtype": str(next(lm.model.parameters()).dtype),
                "max_length": lm.max_length, "strategy": strategy, "bootstrap_resamples": bootstrap, "seed": seed,
                "rouge_available": rouge if generation else None, **extra}
    return EvalResult(model=name, tasks=results, predictions=predictions,
                      macro=float(np.mean(scores)) if scores else None,
                      macro_ci95=macro_bootstrap_ci(per_task_values, resamples=bootstrap, seed=seed),
                      settings=settings, seconds=time.monotonic() - started)


class _TaskRun:
    """One task's items answered by one loaded model: (predictions, truncated, merges, seconds)."""

    def __init__(self, pacer, batch_size: int, strategy: str, rouge: bool):
        self.pacer, self.batch_size, self.strategy, self.rouge = pacer, batch_size, strategy, rouge

    def __call__(self, task: Task, lm: LoadedModel, bar) -> tuple[list[Prediction], int, int, float]:
        bar.set_description(task.name)
        start = time.monotonic()
        if task.type == MULTIPLE_CHOICE:
            preds, truncated, merges = _mc_predictions(task, lm, self.pacer, bar, self.batch_size, self.strategy)
        else:
            preds, truncated, merges = _gen_predictions(task, lm, self.pacer, bar, self.batch_size, self.rouge)
        return preds, truncated, merges, time.monotonic() - start


def items_of(task: Task, indices: list[int]) -> Task:
    """The task with only the items at ``indices``; few-shot examples still drawn from all its items,
    so that each item's context is the one a whole-task evaluation gives it."""
    fewshot = task.settings.fewshot
    if fewshot.num and not fewshot.pool:
        pool = tuple(task.items)
        task = dataclasses.replace(task, settings=dataclasses.replace(
            task.settings, fewshot=dataclasses.replace(fewshot, pool=pool)))
    return dataclasses.replace(task, items=[task.items[i] for i in indices])


def _answer_routed(routed, tasks: list[Task], run: _TaskRun, bar, device, dtype, max_length, keep: int,
                   tokenizer) -> tuple[LoadedModel, list, dict[str, Any]]:
    """Route every item, then answer the items model by model (each loaded once); every prediction
    names the expert that answered it. Returns the last model loaded (for the settings), each task's
    answers in item order, and the routing report for ``results.json``."""
    resident = Resident(lambda ref: load_model(ref, device=resolve_device(device), dtype=dtype,
                                               max_length=max_length), keep)
    try:
        routing = route_items(routed, tasks, resident, run.batch_size)
        parts: list[dict[int, Prediction]] = [{} for _ in tasks]
        counts = [[0, 0, 0.0] for _ in tasks]
        lm = None
        # the models still loaded from routing (perplexity's experts) answer first: no second load
        groups = sorted(routing.groups(), key=lambda g: routed.resolve(routing.models[g[0]]) not in resident.models)
        for m, picked in groups:
            lm = resident.get(routed.resolve(routing.models[m]))
            for t, indices in picked.items():
                sub = items_of(tasks[t], indices)
                preds, truncated, merges, seconds = run(sub, lm, bar)
                for i, p in zip(indices, preds):
                    p.expert = routing.models[m].name
                    parts[t][i] = p
                counts[t] = [counts[t][0] + truncated, counts[t][1] + merges, counts[t][2] + seconds]
        if lm is None:
            lm = resident.get(routed.resolve(routing.models[0]))
    finally:
        resident.close()
    answered = [([parts[t][i] for i in range(len(task.items))], *counts[t]) for t, task in enumerate(tasks)]
    report = {"kind": routed.kind, "threshold": routed.threshold, "resident": keep,
              "model_loads": len(resident.loads), "load_seconds": resident.load_seconds,
              "loaded": resident.loads, **routing.summary(tasks), "notes": routing.notes}
    return lm, answered, {"routed": report}
