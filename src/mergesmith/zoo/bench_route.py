"""Routed rows of the benchmark (``route:<kind>``, docs/route.md): a router over the zoo's experts.

One expert per trained skill, each fitted on the first ``FIT_ITEMS`` items of its skill's train
split (test data is never read while fitting), no fallback.
``mergesmith bench --routers centroid,classifier,perplexity,oracle`` adds the rows to the table, each with:

- routing accuracy: per trained skill, the share of its test items (multiple choice) sent to its
  own expert, and their mean over the trained skills;
- per held-out skill, the share of its test items sent to each expert;
- the build seconds (fitting the router) and the evaluation's wall seconds (``wall_x`` in the
  table divides them by the base's evaluation on the same tasks).

``route:oracle`` is an upper bound, not a router: each trained skill's items go to that skill's
expert; a held-out skill has no expert of its own, so its items go to the expert with the best
**validation** accuracy (multiple choice) on that skill: the best single expert a user could pick
for it without looking at test.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import yaml

from mergesmith.errors import InputError
from mergesmith.route.routers import KINDS

BENCH_ROUTERS = KINDS
# Train items per skill the bench's routers are fitted on. The default zoo's train files hold 2000
# to 4000 items each, and the base's features over all of them took over ten minutes per router on
# the shared machine; the first 256 of each (2048 prompts, eight classes, 192-wide features at the
# default size) suit a centroid or a linear classifier. Set for run time, never on test.
FIT_ITEMS = 256


def fit_files(zoo, folder: Path) -> dict[str, Path]:
    """The first ``FIT_ITEMS`` lines of each trained skill's train file, written under ``folder``
    as ``train/gen/<skill>.jsonl`` (the file name is the task name the router learns)."""
    files = {}
    for s in zoo.trained:
        source = Path(zoo.tasks["train"]["gen"][s])
        target = folder / "train" / "gen" / source.name
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            with source.open(encoding="utf-8") as f:
                lines = [line for _, line in zip(range(FIT_ITEMS), f)]
            tmp = target.with_suffix(".tmp")
            tmp.write_text("".join(lines), encoding="utf-8")
            tmp.replace(target)
        files[s] = target
    return files


def route_recipe(zoo, kind: str, heldout_owner: Optional[dict[str, str]] = None,
                 data: Optional[dict[str, Path]] = None) -> dict:
    """The routing recipe of ``route:<kind>``, each expert fitted on ``data[skill]`` (default: its
    whole train file); for the oracle, ``heldout_owner`` names the expert that answers each held-out
    skill (see the module docstring)."""
    experts = []
    for s in zoo.trained:
        expert = {"name": s, "model": str(zoo.experts[s]),
                  "data": [str(data[s] if data else zoo.tasks["train"]["gen"][s])]}
        if kind == "oracle":
            expert["tasks"] = [s, *sorted(h for h, owner in (heldout_owner or {}).items() if owner == s)]
        experts.append(expert)
    return {"base_model": str(zoo.base), "router": {"kind": kind}, "experts": experts}


def parse_routers(text: str) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = [k for k in kinds if k not in BENCH_ROUTERS]
    if unknown:
        raise InputError(f"--routers: {', '.join(unknown)} not a router kind; choose from {', '.join(BENCH_ROUTERS)}")
    repeated = sorted({k for k in kinds if kinds.count(k) > 1})
    if repeated:
        raise InputError(f"--routers: {', '.join(repeated)} named more than once; name each kind once")
    return kinds


def oracle_owners(val_heldout: dict[str, dict[str, float]], heldout: tuple[str, ...]) -> dict[str, str]:
    """Each held-out skill's best expert on validation (``val_heldout[expert][skill]``); the first
    expert in the zoo's order wins a tie."""
    experts = list(val_heldout)
    return {h: max(experts, key=lambda e: (val_heldout[e][h], -experts.index(e))) for h in heldout}


def routing_measures(routed: dict, zoo) -> dict:
    """Routing accuracy per trained skill and its mean; each held-out skill's shares per expert."""
    shares = routed["share_by_task"]
    by_skill = {s: shares.get(s, {}).get(s, 0.0) for s in zoo.trained}
    return {"routing_accuracy": sum(by_skill.values()) / len(by_skill), "routing_by_skill": by_skill,
            "heldout_shares": {h: shares[h] for h in zoo.heldout if h in shares},
            "model_loads": routed.get("model_loads"), "routing_seconds": routed.get("routing_seconds"),
            "routing_forwards_per_item": routed.get("routing_forwards_per_item")}


def run_route_rows(kinds: tuple[str, ...], zoo, seed: int, work: Path, device: str, cache,
                   timed: Callable[[Path, str], dict], scored: Callable[[str], bool],
                   val_heldout: Callable[[], dict], log: Callable[[str], None]) -> dict[str, dict]:
    """Build (when not cached), score and measure every ``route:<kind>`` row."""
    rows: dict[str, dict] = {}
    for kind in kinds:
        t0 = time.time()
        owners = oracle_owners(val_heldout(), zoo.heldout) if kind == "oracle" else None
        data = fit_files(zoo, work / "routed" / "data" / zoo.root.name)
        recipe = route_recipe(zoo, kind, owners, data)
        key = f"{zoo.root}|route|{json.dumps(recipe, sort_keys=True)}|fit_items={FIT_ITEMS}"
        folder = work / "routed" / f"seed{seed}" / kind
        build_key = f"{key}|build"
        if not (scored(key) and cache._path(build_key).exists()):
            build_route_row(zoo, kind, folder, device, owners, data)
        build = cache.get_or_run(build_key, lambda: {"build_seconds": time.time() - t0})
        evaluated = timed(folder, key)
        shutil.rmtree(folder, ignore_errors=True)
        rows[f"route:{kind}"] = {"scores": {form: v["scores"] for form, v in evaluated.items()},
                                 "eval_seconds": sum(v["seconds"] for v in evaluated.values()), **build,
                                 **routing_measures(evaluated["mc"]["routed"], zoo)}
        if owners:
            rows[f"route:{kind}"]["oracle_heldout_owner"] = owners
        log(f"seed {seed}: route:{kind:12s} routing accuracy {rows[f'route:{kind}']['routing_accuracy']:.3f} "
            f"({time.time() - t0:.0f}s)")
    return rows


def build_route_row(zoo, kind: str, folder: Path, device: str, heldout_owner: Optional[dict[str, str]] = None,
                    data: Optional[dict[str, Path]] = None) -> Path:
    """The routed model folder of ``route:<kind>`` for ``zoo``, written to ``folder``."""
    from mergesmith.route.build import RouteOptions, build_routed

    folder.parent.mkdir(parents=True, exist_ok=True)
    recipe = folder.parent / f"{folder.name}.yml"
    recipe.write_text(yaml.safe_dump(route_recipe(zoo, kind, heldout_owner, data), sort_keys=False), encoding="utf-8")
    build_routed(recipe, folder, options=RouteOptions(overwrite=True, device=device))
    return folder
