"""``mergesmith search``: budgeted recipe search (CMA-ES, random, NSGA-II), on Ray or in-process."""

from __future__ import annotations

import argparse

from mergesmith.search.optimizers import OPTIMIZERS


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "search", help="search a space of recipes for the best one on validation tasks, inside a time budget",
        description="Propose recipes from SPACE (a recipe with {range: [lo, hi]} / {choice: [...]} markers, or "
                    "mergekit-evolve's genome: and tasks:), merge each in memory, score it on a fixed stratified "
                    "subsample of the validation tasks, and keep the best. Writes best.yml, trace.jsonl, "
                    "summary.json, fitness.png (pareto.png with nsga2), the full evaluation of the best recipe "
                    "under final/ and the merged model under model/. See docs/search.md.")
    p.add_argument("space", help="the search space YAML")
    p.add_argument("--tasks", nargs="+", default=[], metavar="FILE",
                   help="validation task files (default: the space's tasks:)")
    p.add_argument("--test-tasks", nargs="+", default=[], metavar="FILE",
                   help="held-out task files: the best recipe is evaluated on them at the end, never searched on")
    p.add_argument("--budget", default="20m", help="wall-clock budget for everything, e.g. 20m, 1h, 90s "
                   "(default 20m)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--workers", type=int, default=1,
                   help="candidates scored at once: 1 runs in this process without Ray; N > 1 starts a local "
                        "Ray cluster with N actors (default 1)")
    p.add_argument("--ray-address", default=None, help="attach to an existing Ray cluster (e.g. auto, or "
                   "ray://host:10001) instead of starting one; --workers actors are started there")
    p.add_argument("--resume", action="store_true", help="continue the search in --out from its trace and "
                   "optimizer state")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="cma",
                   help="cma (CMA-ES, default), random (baseline), nsga2 (multi-objective over tasks)")
    p.add_argument("--seed", type=int, default=0, help="seeds the optimizer and the fitness subsample")
    p.add_argument("--per-task", type=int, default=None,
                   help="fitness items per validation task (default: the space's limit, else 40)")
    p.add_argument("--population", type=int, default=None, help="candidates per generation (default: "
                   "CMA-ES's 4 + 3 ln(genes), 8 for the others, at least --workers)")
    p.add_argument("--fitness", choices=("subsample", "irt"), default="subsample",
                   help="subsample: accuracy on the fitness items (default); irt: full-validation accuracy "
                        "estimated from them by item response theory fitted on the base, the experts and the "
                        "first candidates (MERGE³)")
    p.add_argument("--irt-calibration", type=int, default=8,
                   help="with --fitness irt: candidates evaluated on every item before the fit (default 8)")
    p.add_argument("--irt-holdout-every", type=int, default=5,
                   help="with --fitness irt: every n-th later candidate is also evaluated in full, to report "
                        "the estimator's error (default 5)")
    p.add_argument("--rerank", type=int, default=0, metavar="K",
                   help="at the end, evaluate the K candidates of highest fitness on the full validation tasks "
                        "and keep the best there (the subsample's winner overstates itself); its time is "
                        "kept back from the search (default 0: off)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per worker (default: the cores divided among the workers)")
    p.add_argument("--batch-size", type=int, default=16, help="items per forward pass (default 16)")
    p.add_argument("--reference", action="append", default=[], metavar="MODEL", dest="references",
                   help="a model to compare the best recipe with, evaluated in full on the validation (and test) "
                        "tasks: a model folder, MODEL+ADAPTER, or a routed folder (mergesmith route); with "
                        "--fitness irt its answers also calibrate the item fit. Repeat for several")
    p.add_argument("--no-model", action="store_true", help="do not write the merged best model to OUT/model")
    p.add_argument("--no-progress", action="store_true", help="print nothing while searching")
    p.set_defaults(func=run_search)


def run_search(args: argparse.Namespace) -> int:
    from mergesmith.search.run import SearchOptions, search

    options = SearchOptions(tasks=args.tasks, test_tasks=args.test_tasks, budget_s=args.budget,
                            workers=args.workers, ray_address=args.ray_address, resume=args.resume,
                            optimizer=args.optimizer, seed=args.seed, per_task=args.per_task,
                            population=args.population, threads=args.threads, batch_size=args.batch_size,
                            save_model=not args.no_model, progress=not args.no_progress, fitness=args.fitness,
                            irt_calibration=args.irt_calibration, irt_holdout_every=args.irt_holdout_every,
                            rerank=args.rerank, references=args.references)
    result = search(args.space, args.out, options)
    s = result.summary
    if result.best is None:
        print(f"no candidate was scored within the budget; see {result.out_dir / 'trace.jsonl'}")
        return 3
    print(f"{result.candidates} candidates in {result.seconds:.1f} s; best fitness {result.best['fitness']:.4f} "
          f"(candidate {result.best['index']})")
    rerank = s.get("rerank")
    if rerank:
        scored = [c for c in rerank["candidates"] if c["full_validation"] is not None]
        print(f"rerank: {len(scored)} of the top {rerank['k']} evaluated on the full validation tasks; chose "
              f"candidate {rerank['chosen']} (by fitness alone: {rerank['by_fitness']})")
    for label, final in (s.get("final") or {}).items():
        if isinstance(final, dict) and final.get("macro") is not None:
            print(f"full {label}: mean accuracy {final['macro']:.4f}" + ("" if final["complete"] else
                                                                         " (partial: the budget ran out)"))
    best_validation = ((s.get("final") or {}).get("validation") or {}).get("macro")
    for reference in s.get("references") or []:
        validation = reference.get("validation") or {}
        if validation.get("macro") is not None:
            print(f"reference {reference['model']}: full validation mean accuracy {validation['macro']:.4f}"
                  + ("" if validation["complete"] else " (partial: the budget ran out)")
                  + ("" if best_validation is None else f" (best recipe {best_validation:.4f})"))
    irt = s.get("irt")
    if irt and irt.get("mae") is not None:
        print(f"IRT estimate: mean absolute error {irt['mae']:.4f} against full evaluation on {irt['held_back']} "
              f"held-back candidates (anchor accuracy alone: {irt['mae_of_subsample_alone']:.4f}); evaluation "
              f"{irt['speedup']:.1f}x faster than in full")
    print(f"wrote {result.out_dir / 'best.yml'}; next: mergesmith merge {result.out_dir / 'best.yml'} OUT_DIR")
    return 0
