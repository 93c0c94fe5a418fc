"""Cheap, honest fitness: accuracy on a fixed, stratified subsample of the validation items.

The subsample is drawn once per search (seeded), so every candidate is scored on the
same items and candidates compare fairly. Within each task the items are stratified by
their answer position, so a model that always picks one letter gains no edge from an
unlucky draw. Fitness is the weighted mean of the per-task accuracies (weights from
the space's ``tasks:``, 1 by default); the multi-objective optimizer sees the per-task
accuracies themselves.
"""

from __future__ import annotations

import dataclasses
import random
from collections import defaultdict
from typing import Any, Optional


def stratified_subsample(tasks: list, per_task: Optional[int], seed: int = 0) -> list:
    """Each task with at most ``per_task`` items, drawn evenly across answer positions (seeded).

    Items keep their file order, so prompts (and few-shot draws) are those of the full task.
    ``per_task`` None keeps every item.
    """
    out = []
    for task in tasks:
        items = list(task.items)
        if per_task is None or len(items) <= per_task:
            out.append(task)
            continue
        rng = random.Random(f"{seed}:{task.name}")
        strata: dict[Any, list[int]] = defaultdict(list)
        for i, item in enumerate(items):
            strata[item.answer].append(i)
        for members in strata.values():
            rng.shuffle(members)
        # Round-robin over the strata (largest first) until the subsample is full: proportional
        # when strata are balanced, and never leaves a small stratum out.
        order = sorted(strata.values(), key=len, reverse=True)
        chosen: list[int] = []
        depth = 0
        while len(chosen) < per_task:
            for members in order:
                if depth < len(members) and len(chosen) < per_task:
                    chosen.append(members[depth])
            depth += 1
        keep = sorted(chosen)
        out.append(dataclasses.replace(task, items=[items[i] for i in keep]))
    return out


def weighted_fitness(scores: dict[str, Optional[float]], weights: dict[str, float]) -> float:
    """Weighted mean of the per-task scores; a task left unscored counts as 0."""
    total = sum(weights.get(name, 1.0) for name in scores)
    if total <= 0:
        return 0.0
    return sum(weights.get(name, 1.0) * (s or 0.0) for name, s in scores.items()) / total


def task_scores(result: Any) -> dict[str, Optional[float]]:
    """Per-task headline scores of a harness ``EvalResult``."""
    return {t.name: t.score for t in result.tasks}


def answers_of(result: Any) -> dict[str, list[list]]:
    """Each scored item's headline score, by task: ``{task: [[item position, score], ...]}`` (for
    multiple choice, 1.0 right or 0.0 wrong): what the IRT fit takes from an evaluation."""
    headline = {t.name: t.headline for t in result.tasks}
    answers: dict[str, list[list]] = {}
    for p in result.predictions:
        if p.scores:
            answers.setdefault(p.task, []).append([p.position, float(p.scores[headline[p.task]])])
    return answers


def evaluation_summary(result: Any, weights: Optional[dict[str, float]]) -> dict[str, Any]:
    """One full evaluation as the search's summary reports it: ``macro``, per-task ``scores``,
    ``complete`` (no item left not run) and ``weighted``, the fitness of those scores with
    ``weights`` (None without weights, or unless every task was scored)."""
    scores = task_scores(result)
    return {"macro": result.macro, "scores": scores, "complete": all(t.n_not_run == 0 for t in result.tasks),
            "weighted": weighted_fitness(scores, weights) if weights is not None and
            all(v is not None for v in scores.values()) else None}
