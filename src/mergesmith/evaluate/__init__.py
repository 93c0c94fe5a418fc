"""Evaluate merged models honestly: tasks as data, fast log-likelihood scoring, budgets.

The public API::

    tasks = load_tasks(["arc.jsonl", "test.csv"])
    result = evaluate("out/merged", tasks)            # or a live model with tokenizer=
    result.save("out/eval"); print(result.table())

Names are imported on first use, so that ``mergesmith --help`` and the task loader
do not pay for importing torch. See docs/evaluate.md.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "evaluate": "runner", "Pacer": "runner",
    "EvalResult": "results", "Prediction": "results", "TaskResult": "results",
    "Item": "tasks", "Task": "tasks", "TaskSettings": "tasks", "FewShot": "tasks",
    "load_task": "tasks", "load_tasks": "tasks", "task_from_dataset": "tasks",
    "compete": "compete", "parse_budget": "compete",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mergesmith.evaluate' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"mergesmith.evaluate.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
