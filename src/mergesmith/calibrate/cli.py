"""``mergesmith calibrate``: compute and cache the statistics a recipe's merge will read."""

from __future__ import annotations

import argparse
import sys

from mergesmith.errors import InputError


def register(subparsers) -> None:
    p = subparsers.add_parser("calibrate", help="compute and cache the calibration statistics a recipe needs",
                              description="Run every input model of RECIPE on its calibration data (the recipe's "
                                          "calibration: block) and cache the statistics its method reads, so that "
                                          "mergesmith merge finds them. Cached statistics are not recomputed.")
    p.add_argument("recipe", help="the recipe (mergekit YAML with a calibration: block)")
    p.add_argument("--kinds", nargs="+", choices=("gram", "fisher"), default=None,
                   help="statistics to compute (default: those the recipe's method needs)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    p.add_argument("--dry-run", action="store_true", help="say what is cached and what would be computed")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_calibrate)


def run_calibrate(args: argparse.Namespace) -> int:
    from mergesmith.calibrate import CALIBRATION, plan_statistics
    from mergesmith.checks import pick_device
    from mergesmith.engine.plan import plan_merge

    device = str(pick_device(args.device))
    plan = plan_merge(args.recipe, statistics=CALIBRATION)
    try:
        kinds = tuple(args.kinds) if args.kinds else plan.recipe.method.needs_stats
        if not kinds:
            raise InputError(f"{args.recipe}: merge_method {plan.recipe.method.name} needs no statistics; "
                             "pass --kinds gram or --kinds fisher to compute some anyway")
        stats = plan.stats if plan.stats is not None and plan.stats.kinds == kinds else \
            plan_statistics(plan.recipe, plan.models, kinds)
        for line in stats.describe():
            print(line)
        if not args.dry_run:
            stats.compute(device, progress=not args.no_progress, plan=plan)
        for entry in stats.models:
            if entry is not None:
                for kind, folder in entry.folders.items():
                    state = "cached" if (folder / "index.json").is_file() else "missing"
                    print(f"{entry.ref}: {kind}: {state} in {folder}", file=sys.stderr if args.dry_run else sys.stdout)
        if args.dry_run:
            print("dry run: nothing computed")
    finally:
        for m in plan.models:
            m.checkpoint.close()
    return 0
