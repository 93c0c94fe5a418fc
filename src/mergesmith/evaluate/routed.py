"""A routed model folder run like a model: route every item, then answer expert by expert.

``route_items`` reads each item's own prompt (``item.prompt``: the question, without few-shot
examples or chat template, the same text the router was fitted on) and picks a model for it:
an expert, or the fallback where the router's confidence is below its threshold. The runner
then answers the items grouped by model, so each model is loaded once per run; ``Resident``
keeps at most N loaded (one by default) and counts every load and its seconds.
"""

from __future__ import annotations

import gc
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from mergesmith.errors import InputError
from mergesmith.evaluate.features import mean_last_hidden, prompt_losses
from mergesmith.evaluate.model import LoadedModel
from mergesmith.evaluate.tasks import Task
from mergesmith.route import routers
from mergesmith.route.folder import ModelRef, RoutedModel


class Resident:
    """At most ``keep`` models loaded at once, the least recently used unloaded first."""

    def __init__(self, load: Callable[[str], LoadedModel], keep: int = 1):
        self.load_fn, self.keep = load, keep
        self.models: OrderedDict[str, LoadedModel] = OrderedDict()
        self.loads: list[str] = []
        self.load_seconds = 0.0

    def get(self, ref: str) -> LoadedModel:
        if ref in self.models:
            self.models.move_to_end(ref)
            return self.models[ref]
        while len(self.models) >= self.keep:
            self._unload(next(iter(self.models)))
        start = time.monotonic()
        lm = self.load_fn(ref)
        self.load_seconds += time.monotonic() - start
        self.loads.append(ref)
        self.models[ref] = lm
        return lm

    def _unload(self, ref: str) -> None:
        self.models.pop(ref).restore()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def close(self) -> None:
        for ref in list(self.models):
            self._unload(ref)


@dataclass
class Routing:
    """Which model answers each item: ``chosen[t][i]`` indexes ``models`` (the experts, then the fallback)."""

    models: list[ModelRef]
    chosen: list[list[int]]
    confidence: list[list[float]]
    seconds: float = 0.0
    forwards_per_item: int = 0  # routing forward passes per item (perplexity: one per expert)
    notes: list[str] = field(default_factory=list)

    def groups(self) -> list[tuple[int, dict[int, list[int]]]]:
        """(model index, {task index: item indices}) for every model that answers something."""
        out = []
        for m in range(len(self.models)):
            picked = {t: [i for i, c in enumerate(row) if c == m] for t, row in enumerate(self.chosen)}
            picked = {t: items for t, items in picked.items() if items}
            if picked:
                out.append((m, picked))
        return out

    def summary(self, tasks: list[Task]) -> dict[str, Any]:
        shares = {}
        for task, row in zip(tasks, self.chosen):
            counts = {m.name: sum(c == k for c in row) for k, m in enumerate(self.models)}
            shares[task.name] = {name: n / len(row) for name, n in counts.items() if n} if row else {}
        return {"routing_seconds": self.seconds, "routing_forwards_per_item": self.forwards_per_item,
                "share_by_task": shares}


def oracle_problems(routed: RoutedModel, tasks: list[Task]) -> list[str]:
    owners = {name for e in routed.experts for name in e.tasks}
    missing = [t.name for t in tasks if t.name not in owners]
    if missing and routed.fallback is None:
        return [f"{routed.folder}: the oracle router names no expert for task(s) {', '.join(missing)} and the "
                "routed model has no fallback; name them under an expert's tasks, or add a fallback"]
    return []


def _scores(routed: RoutedModel, texts: list[str], resident: Resident, batch_size: int) -> tuple[torch.Tensor, int]:
    if routed.kind in routers.FEATURE_KINDS:
        feats = mean_last_hidden(resident.get(routed.resolve(routed.base)), texts, batch_size)
        if routed.kind == "centroid":
            return routers.centroid_scores(feats, routed.router["centroids"]), 1
        return routers.classifier_scores(feats, routed.router), 1
    if routed.kind == "perplexity":
        losses = torch.stack([prompt_losses(resident.get(routed.resolve(e)), texts, batch_size)
                              for e in routed.experts], dim=1)
        return routers.perplexity_scores(losses), len(routed.experts)
    raise InputError(f"{routed.folder}: router kind {routed.kind!r} is not known; use one of "
                     f"{', '.join(routers.KINDS)}")


def route_items(routed: RoutedModel, tasks: list[Task], resident: Resident, batch_size: int = 8) -> Routing:
    """The model that answers every item of every task (see the module docstring)."""
    start = time.monotonic()
    models = list(routed.experts) + ([routed.fallback] if routed.fallback is not None else [])
    fallback = len(routed.experts) if routed.fallback is not None else None
    if routed.kind == "oracle":
        owner = {name: k for k, e in enumerate(routed.experts) for name in e.tasks}
        chosen = [[owner.get(t.name, fallback)] * len(t.items) for t in tasks]
        return Routing(models, chosen, [[1.0] * len(t.items) for t in tasks], time.monotonic() - start, 0,
                       ["oracle: each task's items go to the expert named for it (an upper bound, not a router)"])
    texts = [item.prompt for t in tasks for item in t.items]
    scores, forwards = _scores(routed, texts, resident, batch_size) if texts else (torch.zeros((0, 1)), 0)
    threshold = routed.threshold if fallback is not None else None
    flat, conf = routers.choose(scores, threshold) if texts else ([], [])
    flat = [fallback if c == -1 else c for c in flat]
    chosen, confidence, k = [], [], 0
    for t in tasks:
        chosen.append(flat[k:k + len(t.items)])
        confidence.append(conf[k:k + len(t.items)])
        k += len(t.items)
    return Routing(models, chosen, confidence, time.monotonic() - start, forwards)
