"""Budgeted recipe search: propose recipes, merge them in memory, score them, keep the best.

    from mergesmith.search import search
    result = search("space.yml", "runs/search", tasks=["val/facts.jsonl"], budget_s="5m", workers=2)

See docs/search.md. ``space`` reads the search space (our ranges or mergekit-evolve's
genome), ``candidate`` merges into a resident model with cached inputs, ``fitness``
draws the subsample, ``optimizers`` holds CMA-ES, random search and NSGA-II,
``workers`` runs candidates in-process or on Ray, ``run`` is the budgeted loop.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    # Lazy, so that `mergesmith --help` does not import torch.
    if name in ("search", "SearchOptions", "SearchResult"):
        from mergesmith.search import run

        return getattr(run, name)
    if name in ("load_space", "SearchSpace"):
        from mergesmith.search import space

        return getattr(space, name)
    raise AttributeError(f"module 'mergesmith.search' has no attribute {name!r}")
