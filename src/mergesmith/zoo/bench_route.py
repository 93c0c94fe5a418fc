"""Routed rows of the benchmark (``route:<kind>``, docs/route.md): a router over the zoo's experts.

One expert per trained skill, each fitted on its skill's train split (test data is never read
while fitting), no fallback. ``mergesmith bench --routers centroid,classifier`` adds the rows to
the table; ``benchmarks/bench_route_zoo.py`` adds routing accuracy, held-out shares and the oracle.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from mergesmith.errors import InputError
from mergesmith.route.routers import KINDS

# the oracle names no expert for a held-out skill, and every bench row covers every skill
BENCH_ROUTERS = tuple(k for k in KINDS if k != "oracle")


def route_recipe(zoo, kind: str) -> dict:
    return {"base_model": str(zoo.base), "router": {"kind": kind},
            "experts": [{"name": s, "model": str(zoo.experts[s]), "data": [str(zoo.tasks["train"]["gen"][s])]}
                        for s in zoo.trained]}


def parse_routers(text: str) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = [k for k in kinds if k not in BENCH_ROUTERS]
    if unknown:
        why = (" (the oracle has no expert for a held-out skill: benchmarks/bench_route_zoo.py measures it on "
               "the trained skills)" if "oracle" in unknown else "")
        raise InputError(f"--routers: {', '.join(unknown)} not a router kind the table takes{why}; choose from "
                         f"{', '.join(BENCH_ROUTERS)}")
    return kinds


def build_route_row(zoo, kind: str, folder: Path, device: str) -> Path:
    """The routed model folder of ``route:<kind>`` for ``zoo``, written to ``folder``."""
    from mergesmith.route.build import RouteOptions, build_routed

    folder.parent.mkdir(parents=True, exist_ok=True)
    recipe = folder.parent / f"{folder.name}.yml"
    recipe.write_text(yaml.safe_dump(route_recipe(zoo, kind), sort_keys=False), encoding="utf-8")
    build_routed(recipe, folder, options=RouteOptions(overwrite=True, device=device))
    return folder
