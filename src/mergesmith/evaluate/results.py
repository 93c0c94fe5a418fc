"""What an evaluation returns and writes: per-item predictions, per-task metrics, the macro average.

``results.json`` holds the settings, each task's metrics (the headline one with a
95% bootstrap interval) and counts, and the macro average over the tasks that
have labelled items, all tasks weighted equally as in the competition.
``predictions.jsonl`` has one line per item: ``task``, ``id``, ``prediction`` (the
chosen index, or the generated text; null when the item was not run) and for
multiple choice ``loglikelihoods``, the summed log-likelihood of each choice in order.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from mergesmith.evaluate.tasks import MULTIPLE_CHOICE, SkippedRow

SCORED, UNLABELLED, NOT_RUN = "scored", "unlabelled", "not_run"


@dataclass
class Prediction:
    task: str
    id: str
    type: str
    prediction: Union[int, str, None]
    status: str = SCORED
    loglikelihoods: Optional[list[float]] = None
    num_tokens: Optional[list[int]] = None
    chosen: Optional[dict[str, int]] = None  # the argmax under each multiple-choice metric
    answer: Optional[int] = None
    references: Optional[list[str]] = None
    scores: Optional[dict[str, float]] = None  # this item's value of each metric (labelled items)
    truncated_tokens: int = 0
    source: str = ""
    position: int = 0
    expert: Optional[str] = None  # the expert that answered, when a routed model did

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"task": self.task, "id": self.id, "type": self.type, "prediction": self.prediction,
                               "status": self.status}
        if self.type == MULTIPLE_CHOICE:
            out.update(loglikelihoods=self.loglikelihoods, num_tokens=self.num_tokens, chosen=self.chosen,
                       answer=self.answer)
        else:
            out.update(references=self.references)
        out.update(scores=self.scores, truncated_tokens=self.truncated_tokens)
        if self.expert is not None:
            out["expert"] = self.expert
        return out


@dataclass
class TaskResult:
    name: str
    type: str
    source: str
    headline: str
    score: Optional[float]  # the headline metric's mean over scored items; None if none are labelled
    ci95: Optional[tuple[float, float]]
    metrics: dict[str, float]
    n_items: int
    n_scored: int
    n_unlabelled: int
    n_not_run: int
    truncated: int  # items whose context lost tokens on the left
    boundary_merges: int  # choices the tokenizer merged with the prompt, re-encoded alone
    skipped: list[SkippedRow] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["skipped_rows"] = len(self.skipped)
        out["skipped"] = [asdict(s) for s in self.skipped]
        out["ci95"] = list(self.ci95) if self.ci95 else None
        out["items_per_second"] = (self.n_items - self.n_not_run) / self.seconds if self.seconds else None
        return out


@dataclass
class EvalResult:
    model: str
    tasks: list[TaskResult]
    predictions: list[Prediction]
    macro: Optional[float]
    macro_ci95: Optional[tuple[float, float]]
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def complete(self) -> bool:
        return all(t.n_not_run == 0 for t in self.tasks)

    @property
    def not_run(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for p in self.predictions:
            if p.status == NOT_RUN:
                out.setdefault(p.task, []).append(p.id)
        return out

    def task(self, name: str) -> TaskResult:
        return next(t for t in self.tasks if t.name == name)

    def to_dict(self) -> dict[str, Any]:
        scored = [t.name for t in self.tasks if t.score is not None]
        return {
            "model": self.model,
            "settings": self.settings,
            "tasks": {t.name: t.to_json() for t in self.tasks},
            "macro_average": {"score": self.macro, "ci95": list(self.macro_ci95) if self.macro_ci95 else None,
                              "tasks": scored, "n_tasks": len(scored)},
            "complete": self.complete,
            "not_run": self.not_run,
            "seconds": self.seconds,
        }

    def save(self, out_dir: Union[str, Path]) -> tuple[Path, Path]:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        results, predictions = out / "results.json", out / "predictions.jsonl"
        results.write_text(json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n", encoding="utf-8")
        with open(predictions, "w", encoding="utf-8") as fh:
            for p in self.predictions:
                fh.write(json.dumps(p.to_json(), ensure_ascii=False) + "\n")
        return results, predictions

    def table(self) -> str:
        """A plain-text table for the terminal."""
        header = ("task", "type", "items", "metric", "score", "95% CI")
        rows = []
        for t in self.tasks:
            kind = "mc" if t.type == MULTIPLE_CHOICE else "gen"
            count = f"{t.n_scored}/{t.n_items}"
            rows.append((t.name, kind, count, t.headline, _fmt(t.score), _fmt_ci(t.ci95)))
        n = sum(t.score is not None for t in self.tasks)
        rows.append((f"macro average ({n} task{'s' if n != 1 else ''})", "", "", "", _fmt(self.macro),
                     _fmt_ci(self.macro_ci95)))
        widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
        line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
        rule = "  ".join("-" * w for w in widths)
        lines = [line(header), rule, *(line(r) for r in rows[:-1]), rule, line(rows[-1])]
        lines += self.notes()
        return "\n".join(lines)

    def notes(self) -> list[str]:
        out = []
        if self.settings.get("rouge_available") is False:
            out.append("rougeL not computed: the rouge-score package is not installed (pip install 'mergesmith[eval]')")
        for t in self.tasks:
            others = {m: v for m, v in t.metrics.items() if m != t.headline}
            if t.type != MULTIPLE_CHOICE and others:  # e.g. exact match beside a ROUGE-L headline
                out.append(f"{t.name}: also " + ", ".join(f"{m} {_fmt(v)}" for m, v in others.items()))
            if t.n_unlabelled:
                out.append(f"{t.name}: {t.n_unlabelled} unlabelled item(s) predicted, not scored")
            if t.n_not_run:
                out.append(f"{t.name}: {t.n_not_run} item(s) NOT RUN (budget)")
            if t.truncated:
                out.append(f"{t.name}: {t.truncated} prompt(s) longer than the context, truncated on the left")
            if t.skipped:
                out.append(f"{t.name}: {len(t.skipped)} bad row(s) skipped")
            if t.boundary_merges:
                out.append(f"{t.name}: {t.boundary_merges} choice(s) merged with the prompt by the tokenizer, "
                           "encoded separately")
        return out


def _fmt(x: Optional[float]) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.4f}"


def _fmt_ci(ci: Optional[tuple[float, float]]) -> str:
    return "-" if ci is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"
