"""``evaluate(model, tasks)``: generic over tasks, one pass per task, optionally inside a deadline."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import numpy as np
from tqdm.auto import tqdm

from mergesmith.evaluate.generation import encode_gen, generate
from mergesmith.errors import InputError
from mergesmith.evaluate.metrics import (bootstrap_ci, generation_scores, macro_bootstrap_ci, mc_choices,
                                         rouge_available)
from mergesmith.evaluate.model import LoadedModel, load_model
from mergesmith.evaluate.prompts import render_context
from mergesmith.evaluate.results import NOT_RUN, SCORED, UNLABELLED, EvalResult, Prediction, TaskResult
from mergesmith.evaluate.scoring import encode_mc, score_mc
from mergesmith.evaluate.tasks import GEN_METRICS, MC_METRICS, MULTIPLE_CHOICE, Task, load_tasks


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
             pacer: Optional[Pacer] = None) -> EvalResult:
    """Evaluate a model (folder path, hub id, or live ``transformers`` model) on tasks.

    ``tasks`` are ``Task`` objects or task file paths. ``deadline`` is a
    ``time.monotonic()`` instant: batches that would end after it are not run and
    their items are reported as ``not_run``. ``bootstrap`` is the number of
    resamples for the confidence intervals (0: none).
    """
    started = time.monotonic()
    if isinstance(tasks, (str, Path)):
        tasks = [tasks]
    tasks = list(tasks)
    if tasks and not isinstance(tasks[0], Task):
        tasks = load_tasks(tasks)
    if not tasks:
        raise InputError("no tasks to evaluate; give at least one task or task file")
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    generation = [t for t in tasks if t.type != MULTIPLE_CHOICE]
    rouge = bool(generation) and rouge_available()
    if generation and not rouge and any(t.headline == "rougeL" for t in generation):
        raise InputError("a task's metric is rougeL but the rouge-score package is not installed: "
                         "pip install 'mergesmith[eval]'")
    lm = load_model(model, tokenizer, device=device, dtype=dtype, max_length=max_length)
    if pacer is None and deadline is not None:
        pacer = Pacer(deadline)
    results, predictions, per_task_values = [], [], []
    bar = tqdm(total=sum(len(t.items) for t in tasks), desc="evaluate", unit="item", disable=not progress)
    try:
        for task in tasks:
            bar.set_description(task.name)
            start = time.monotonic()
            if task.type == MULTIPLE_CHOICE:
                preds, truncated, merges = _mc_predictions(task, lm, pacer, bar, batch_size, strategy)
            else:
                preds, truncated, merges = _gen_predictions(task, lm, pacer, bar, batch_size, rouge)
            result, values = _task_result(task, preds, truncated, merges, time.monotonic() - start,
                                          bootstrap, seed)
            results.append(result)
            predictions.extend(preds)
            if result.score is not None:
                per_task_values.append(values)
    finally:
        bar.close()
        lm.restore()
    scores = [r.score for r in results if r.score is not None]
    settings = {"batch_size": batch_size, "device": str(lm.device), "dtype": str(next(lm.model.parameters()).dtype),
                "max_length": lm.max_length, "strategy": strategy, "bootstrap_resamples": bootstrap, "seed": seed,
                "rouge_available": rouge if generation else None}
    return EvalResult(model=lm.name, tasks=results, predictions=predictions,
                      macro=float(np.mean(scores)) if scores else None,
                      macro_ci95=macro_bootstrap_ci(per_task_values, resamples=bootstrap, seed=seed),
                      settings=settings, seconds=time.monotonic() - started)
