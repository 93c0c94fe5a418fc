"""The "must show" figures of budgeted recipe search (issue 10), measured on the zoo.

    python benchmarks/bench_search.py --out runs/bench-search              # default zoo, every part
    python benchmarks/bench_search.py --size test --budget 6s --short-budget 6s --seeds 0 --out /tmp/bs

Parts (``--parts``, default all):

1. ``grid``: a TIES search over the trained experts (per-expert weight and density, lambda; a
   ``--budget`` per search, search seeds ``--seeds``, ``--workers``) against the best point of
   ``mergesmith bench``'s TIES validation grid, chosen by bench's own ``select`` on the same
   validation tasks and cached in bench's ``EvalCache`` (``--bench-work`` may point at a bench
   run's ``work/`` folder to reuse its evaluations). Both recipes are merged and scored on every
   test task (multiple choice); the table gives ``avg_trained`` and ``avg_heldout``, the search as
   mean ± std over its seeds, and whether the difference exceeds that spread. With ``--rerank K``
   the searches re-rank their top K candidates on the full validation tasks (folders
   ``grid-seedN-rerankK``); where that changes the pick, the candidate of highest fitness is
   merged and scored on test too, so a small table pairs the two picks of each search.
2. ``gap``: for each search of part 1, the best candidate's fitness (subsample accuracy), its full
   validation accuracy (the search's final evaluation) and its test accuracy on the trained skills.
3. ``throughput``: candidates per minute with 1 and 2 workers (2: Ray actors) and the shares of the
   workers' time spent merging, evaluating, building and waiting: the search's ``throughput``
   summary, for a search of ``--short-budget`` each.
4. ``irt``: a ``--fitness irt`` search of ``--short-budget``; its estimator's mean absolute error
   against full evaluation on held-back candidates, and the evaluation speedup (the search's
   ``irt`` summary).
5. ``selection``: a search over the zoo's whole pool (full experts, LoRA experts, distractors), each
   with ``include: {choice: [true, false]}``; which ones the best recipe keeps, and its test scores.

Everything is printed as tables and saved to ``OUT/report.json``; each search keeps its folder
(``OUT/<part>-...``) and is reused, not rerun, when its ``summary.json`` is there. Searches count
their own time only; merging and scoring on the test split happen outside every budget.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

import yaml

PARTS = ("grid", "gap", "throughput", "irt", "selection")
METHOD = "ties"  # the family searched and compared: bench's TIES grid (density x lambda)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    from mergesmith.units import parse_budget

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="where the searches, their evaluations and report.json go")
    p.add_argument("--size", default="default", help="zoo size: default (the issue's figures) or test (a smoke run)")
    p.add_argument("--zoo-seed", type=int, default=0)
    p.add_argument("--cache", type=Path, default=None, help="the zoo cache (default: mergesmith's)")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--budget", default="15m", help="budget of each search of parts 1, 2 and 5 (default 15m)")
    p.add_argument("--short-budget", default="5m", help="budget of each search of parts 3 and 4 (default 5m)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="search seeds (default 0 1 2)")
    p.add_argument("--workers", type=int, default=2, help="workers of the searches of parts 1, 2, 4, 5 (default 2)")
    p.add_argument("--throughput-workers", nargs="+", type=int, default=[1, 2],
                   help="worker counts compared in part 3 (default 1 2)")
    p.add_argument("--per-task", type=int, default=None, help="fitness items per task (default: search's, 40)")
    p.add_argument("--rerank", type=int, default=0, metavar="K",
                   help="the grid part's searches re-rank their top K candidates on the full validation tasks "
                        "(default 0: off)")
    p.add_argument("--bench-work", type=Path, default=None,
                   help="bench's work folder whose evaluation cache to share (default OUT/bench-work)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--quiet", action="store_true", help="no progress from the zoo build and the searches")
    args = p.parse_args(argv)
    args.budget_s = parse_budget(args.budget)
    args.short_budget_s = parse_budget(args.short_budget)
    return args


class Bench:
    """The zoo, bench's configuration, its evaluation cache and the test tasks, shared by the parts."""

    def __init__(self, args: argparse.Namespace):
        from mergesmith.zoo import bench as B
        from mergesmith.zoo.build import build_zoo

        self.args = args
        self.zoo = build_zoo(args.size, args.zoo_seed, args.cache, progress=not args.quiet)
        work = args.bench_work or args.out / "bench-work"
        self.cfg = B.BenchConfig(out=args.out, size=args.size, zoo_seed=args.zoo_seed, seeds=(0,), methods=(METHOD,),
                                 cache=args.cache, batch_size=args.batch_size, progress=not args.quiet)
        self.cache = B.EvalCache(work / "evals")
        self.merges = work / "merges" / "seed0"
        test = {"mc": B.load_task_set(self.zoo.task_files("test", "mc"), "mc", None),
                "gen": B.load_task_set(self.zoo.task_files("test", "gen"), "gen", None)}
        self.test_mc = test["mc"]
        # bench's cache key for a test score: the same string as run_seed's, so a bench run's scores are reused
        self.limits = "limit=None|" + "|".join(f"{form}={B.task_set_key(t)}" for form, t in test.items())
        self.val_files = [str(f) for f in self.zoo.task_files("validation", "mc", list(self.zoo.trained))]
        self.val = B.load_task_set([Path(f) for f in self.val_files], "mc", None)

    def log(self, text: str) -> None:
        if not self.args.quiet:
            print(text, file=sys.stderr, flush=True)

    def test_scores(self, recipe: dict) -> dict[str, float]:
        """Multiple-choice accuracy per test skill of ``recipe``, merged to disk (cached as bench caches)."""
        from mergesmith.zoo import bench as B

        key = f"{self.zoo.root}|{json.dumps(recipe, sort_keys=True)}"
        folder = self.merges / "search-eval"

        def run() -> dict:
            folder.parent.mkdir(parents=True, exist_ok=True)
            B.merge_into(recipe, folder, self.cfg.device)
            try:
                return B.score(folder, self.test_mc, self.cfg.device, self.cfg.batch_size)
            finally:
                shutil.rmtree(folder, ignore_errors=True)

        return self.cache.get_or_run(f"{key}|test|mc|{self.limits}", run)

    def averages(self, scores: dict[str, float]) -> dict[str, float]:
        from mergesmith.zoo.bench import mean

        return {"avg_trained": mean(scores[s] for s in self.zoo.trained),
                "avg_heldout": mean(scores[s] for s in self.zoo.heldout)}

    def search(self, name: str, space: dict, *, budget_s: float, seed: int = 0, workers: int = 1,
               **options: Any) -> dict:
        """One search in ``OUT/name`` (reused if finished before); its summary and best recipe."""
        from mergesmith.search import search

        folder = self.args.out / name
        done = folder / "summary.json"
        if done.is_file() and (folder / "best.yml").is_file():
            self.log(f"{name}: reusing the finished search in {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            (folder.parent / f"{name}.space.yml").write_text(yaml.safe_dump(space, sort_keys=False))
            self.log(f"{name}: searching for {budget_s:.0f} s with {workers} worker(s), seed {seed}")
            search(folder.parent / f"{name}.space.yml", folder, tasks=self.val_files, budget_s=budget_s, seed=seed,
                   workers=workers, per_task=self.args.per_task, save_model=False, progress=not self.args.quiet,
                   batch_size=self.args.batch_size, **options)
        summary = json.loads(done.read_text())
        best = folder / "best.yml"
        summary["recipe"] = yaml.safe_load(best.read_text()) if best.is_file() else None
        return summary

    def candidate_recipe(self, name: str, index: int) -> dict:
        """The recipe of candidate ``index`` of search ``name``: its trace's parameters, written into the
        space as the search writes ``best.yml``."""
        from mergesmith.search.space import load_space

        folder = self.args.out / name
        with (folder / "trace.jsonl").open() as trace:
            record = next(r for r in map(json.loads, trace) if r["index"] == index)
        return load_space(folder.parent / f"{name}.space.yml").recipe(record["params"])


# ----------------------------------------------------------------------------- the spaces


def ties_space(zoo) -> dict:
    """bench's TIES recipe (every trained expert, normalize on) with its grid's settings searched
    per expert (density, and a weight the grid fixes at 1) and lambda over the grid's span."""
    from mergesmith.zoo.bench import TIES_LAMBDAS

    return {"merge_method": METHOD, "base_model": str(zoo.base), "dtype": "float32",
            "parameters": {"lambda": {"range": [0.5, max(TIES_LAMBDAS)]}},
            "models": [{"model": str(zoo.experts[s]),
                        "parameters": {"weight": {"range": [0.0, 1.0]}, "density": {"range": [0.1, 1.0]}}}
                       for s in zoo.trained]}


def pool_reference(zoo, member) -> str:
    """How a recipe names a pool member: a LoRA adapter as base+adapter."""
    return f"{zoo.base}+{member.path}" if member.kind == "lora" else str(member.path)


def pool_space(zoo) -> dict:
    space = ties_space(zoo)
    space["models"] = [{"model": pool_reference(zoo, m), "include": {"choice": [True, False]},
                        "parameters": {"weight": {"range": [0.0, 1.0]}, "density": {"range": [0.1, 1.0]}}}
                       for m in zoo.pool]
    return space


# ----------------------------------------------------------------------------- the parts


def spread(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def part_grid(b: Bench, report: dict) -> None:
    """Parts 1 and 2: searched recipes against bench's best grid point; validation fitness against test."""
    from mergesmith.zoo import bench as B

    t0 = time.time()
    point, trials = B.select(b.cfg, b.zoo, METHOD, 0, b.val, b.cache, b.merges, b.log)
    grid_recipe = B.recipe_for(b.zoo, METHOD, point, 0)
    grid = {"chosen": point, "validation": max(t["validation"] for t in trials) if trials else None,
            "trials": trials, **b.averages(b.test_scores(grid_recipe)), "seconds": round(time.time() - t0, 1)}
    searches = []
    k = b.args.rerank
    for seed in b.args.seeds:
        # A rerank changes what a search chooses: its folder says so, and one without it is not reused for it.
        name = f"grid-seed{seed}" + (f"-rerank{k}" if k else "")
        s = b.search(name, ties_space(b.zoo), budget_s=b.args.budget_s, seed=seed, workers=b.args.workers,
                     **({"rerank": k} if k else {}))
        row = {"seed": seed, "candidates": s["candidates"], "seconds": s["seconds"],
               "within_budget": s["within_budget"], "fitness": (s.get("best") or {}).get("fitness"),
               "full_validation": ((s.get("final") or {}).get("validation") or {}).get("macro")}
        if s["recipe"] is not None:
            row.update(b.averages(b.test_scores(s["recipe"])))
        if s.get("rerank") and "avg_trained" in row:
            row["rerank"] = rerank_pair(b, name, s["rerank"], row)
        searches.append(row)
    scored = [r for r in searches if "avg_trained" in r]
    summary: dict[str, Any] = {"grid": grid, "searches": searches}
    for key in ("avg_trained", "avg_heldout"):
        if scored:
            m, sd = spread([r[key] for r in scored])
            diff = m - grid[key]
            several = len(scored) > 1  # one seed has no spread to compare against
            summary[key] = {"search_mean": m, "search_std": sd, "grid": grid[key], "difference": diff,
                            "seeds": len(scored), "exceeds_seed_spread": abs(diff) > sd if several else None,
                            "search_better": diff > sd if several else None}
    report["grid"] = summary
    report["gap"] = [{"seed": r["seed"], "fitness": r["fitness"], "full_validation": r["full_validation"],
                      "test_avg_trained": r.get("avg_trained"),
                      "fitness_minus_test": None if r["fitness"] is None or "avg_trained" not in r
                      else r["fitness"] - r["avg_trained"],
                      "full_validation_minus_test": None if r["full_validation"] is None or "avg_trained" not in r
                      else r["full_validation"] - r["avg_trained"]} for r in searches]


def rerank_pair(b: Bench, name: str, block: dict, row: dict) -> dict:
    """The by-fitness pick against the reranked pick of one search, both on test (paired: the same search)."""
    by_index = {c["index"]: c for c in block["candidates"]}
    chosen, by_fitness = block["chosen"], block["by_fitness"]
    reranked = {"avg_trained": row["avg_trained"], "avg_heldout": row["avg_heldout"]}
    plain = reranked if chosen == by_fitness else b.averages(b.test_scores(b.candidate_recipe(name, by_fitness)))
    return {"k": block["k"], "reranked_candidates": sum(c["full_validation"] is not None
                                                        for c in block["candidates"]),
            "note": block.get("note"),
            "by_fitness": {"index": by_fitness, "fitness": by_index[by_fitness]["fitness"],
                           "full_validation": by_index[by_fitness]["full_validation"], **plain},
            "chosen": {"index": chosen, "fitness": by_index[chosen]["fitness"],
                       "full_validation": by_index[chosen]["full_validation"], **reranked}}


def part_throughput(b: Bench, report: dict) -> None:
    rows = []
    for workers in b.args.throughput_workers:
        try:
            s = b.search(f"throughput-w{workers}", ties_space(b.zoo), budget_s=b.args.short_budget_s,
                         workers=workers)
        except Exception as err:  # e.g. Ray not installed: that row says so, the others still run
            rows.append({"workers": workers, "error": str(err)})
            continue
        rows.append({"workers": workers, **s["throughput"], "start_workers_s": s.get("start_workers_s"),
                     "seconds": s["seconds"], "budget_s": s["budget_s"]})
    report["throughput"] = rows


def part_irt(b: Bench, report: dict) -> None:
    s = b.search("irt", ties_space(b.zoo), budget_s=b.args.short_budget_s, workers=b.args.workers, fitness="irt")
    report["irt"] = {**(s.get("irt") or {}), "candidates": s["candidates"], "seconds": s["seconds"]}


def part_selection(b: Bench, report: dict) -> None:
    s = b.search("selection", pool_space(b.zoo), budget_s=b.args.budget_s, workers=b.args.workers)
    members = []
    kept_refs = {m["model"] for m in (s["recipe"] or {}).get("models", [])}
    for m in b.zoo.pool:
        members.append({"name": m.name, "kind": m.kind, "clean": m.clean,
                        "kept": pool_reference(b.zoo, m) in kept_refs})
    result: dict[str, Any] = {"members": members, "candidates": s["candidates"],
                              "fitness": (s.get("best") or {}).get("fitness"),
                              "kept_distractors": [m["name"] for m in members if m["kept"] and not m["clean"]],
                              "dropped_clean": [m["name"] for m in members if not m["kept"] and m["clean"]]}
    if s["recipe"] is not None:
        result.update(b.averages(b.test_scores(s["recipe"])))
    report["selection"] = result


# ----------------------------------------------------------------------------- tables


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(header: list[str], rows: list[list[Any]]) -> str:
    cells = [header] + [[fmt(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def print_report(report: dict) -> None:
    if "grid" in report:
        g = report["grid"]
        print(f"\n1. searched {METHOD} recipe vs bench's best validation-grid point {g['grid']['chosen']} (test, mc)")
        rows = [["bench grid", fmt(g["grid"]["avg_trained"]), fmt(g["grid"]["avg_heldout"]), "-"]]
        rows += [[f"search seed {r['seed']}", fmt(r.get("avg_trained")), fmt(r.get("avg_heldout")), r["candidates"]]
                 for r in g["searches"]]
        for key in ("avg_trained", "avg_heldout"):
            if key in g:
                v = g[key]
                print(f"   {key}: search {v['search_mean']:.3f} ± {v['search_std']:.3f} vs grid {v['grid']:.3f}: "
                      f"difference {v['difference']:+.3f}, "
                      + ("no spread with one seed" if v["exceeds_seed_spread"] is None else
                         f"{'exceeds' if v['exceeds_seed_spread'] else 'within'} the seed spread"))
        print(table(["recipe", "avg_trained", "avg_heldout", "candidates"], rows))
        paired = [r for r in g["searches"] if "rerank" in r]
        if paired:
            print(f"\n1b. rerank: the search's pick by fitness vs its pick among the top {paired[0]['rerank']['k']} "
                  "by full validation (test, mc; the same searches)")
            print(table(["seed", "by fitness", "reranked", "full_val", "full_val (rr)", "avg_trained",
                         "avg_trained (rr)", "avg_heldout", "avg_heldout (rr)"],
                        [[r["seed"], p["by_fitness"]["index"], p["chosen"]["index"], p["by_fitness"]["full_validation"],
                          p["chosen"]["full_validation"], p["by_fitness"]["avg_trained"], p["chosen"]["avg_trained"],
                          p["by_fitness"]["avg_heldout"], p["chosen"]["avg_heldout"]]
                         for r in paired for p in [r["rerank"]]]))
            for p in (r["rerank"] for r in paired if r["rerank"]["note"]):
                print(f"   note: {p['note']}")
    if "gap" in report:
        print("\n2. validation fitness vs test accuracy of each best candidate (trained skills)")
        print(table(["seed", "fitness", "full_validation", "test", "fitness-test", "full_val-test"],
                    [[r["seed"], r["fitness"], r["full_validation"], r["test_avg_trained"], r["fitness_minus_test"],
                      r["full_validation_minus_test"]] for r in report["gap"]]))
    if "throughput" in report:
        print("\n3. throughput")
        print(table(["workers", "cand/min", "merge", "eval", "setup", "wait", "start_s", "error"],
                    [[r["workers"], r.get("candidates_per_min"), r.get("merge_share"), r.get("eval_share"),
                      r.get("setup_share"), r.get("wait_share"), r.get("start_workers_s"), r.get("error")]
                     for r in report["throughput"]]))
    if "irt" in report:
        i = report["irt"]
        print(f"\n4. IRT estimator: MAE {fmt(i.get('mae'), 4)} on {fmt(i.get('held_back'))} held-back candidates "
              f"(subsample alone {fmt(i.get('mae_of_subsample_alone'), 4)}); speedup {fmt(i.get('speedup'), 1)}x; "
              f"{i['candidates']} candidates" + ("" if i.get("mae") is not None else
                                                 " (no held-back candidate within the budget: no error measured)"))
    if "selection" in report:
        s = report["selection"]
        print(f"\n5. model selection over the pool: test avg_trained {fmt(s.get('avg_trained'))}, "
              f"avg_heldout {fmt(s.get('avg_heldout'))}; kept distractors: {s['kept_distractors'] or 'none'}")
        print(table(["member", "kind", "clean", "kept"], [[m["name"], m["kind"], m["clean"], m["kept"]]
                                                          for m in s["members"]]))


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    b = Bench(args)
    report: dict[str, Any] = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                              "zoo": str(b.zoo.root)}
    if "grid" in args.parts or "gap" in args.parts:
        part_grid(b, report)
        for part in ("grid", "gap"):
            if part not in args.parts:
                report.pop(part)
    if "throughput" in args.parts:
        part_throughput(b, report)
    if "irt" in args.parts:
        part_irt(b, report)
    if "selection" in args.parts:
        part_selection(b, report)
    report["seconds"] = round(time.time() - started, 1)
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print_report(report)
    print(f"\nwrote {args.out / 'report.json'} ({report['seconds']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
