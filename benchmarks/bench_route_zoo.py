"""Routed models on the proving ground: route:<kind> rows beside the experts, the multitask model
and the base, on one zoo and one seed.

For each router kind a routing recipe is written from the zoo: the base model, one expert per
trained skill fitted on that skill's train split (``data/tasks/train/gen/<skill>.jsonl``; test
data is never read while fitting), no fallback. Every row is evaluated on the multiple-choice
test tasks of every skill. The oracle is evaluated on the trained skills only: it has no expert
to name for a held-out skill. Printed and written to ``--out``/route_zoo.json:

- avg_trained and avg_heldout (multiple-choice accuracy, each skill weighted equally), and with
  ``--generation`` gen_trained and gen_heldout (exact match on the generation form of the tasks);
- routing accuracy per trained skill: the share of its test items sent to its own expert;
- for each held-out skill, the share of its items sent to each expert;
- wall time of the routed evaluation relative to evaluating the multitask model on the same tasks.

    .venv/bin/python benchmarks/bench_route_zoo.py --size test --out out/route-zoo
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import yaml

from mergesmith.evaluate import evaluate
from mergesmith.route.build import RouteOptions, build_routed
from mergesmith.zoo.bench import load_task_set
from mergesmith.zoo.bench_route import route_recipe
from mergesmith.zoo.build import build_zoo


def averages(scores: dict[str, float], zoo, prefix: str = "avg") -> dict[str, float]:
    def avg(skills):
        values = [scores[s] for s in skills if s in scores]
        return statistics.mean(values) if values else None

    return {f"{prefix}_trained": avg(zoo.trained), f"{prefix}_heldout": avg(zoo.heldout)}


def generation_row(model, zoo, tasks, args) -> dict[str, float]:
    if not tasks:
        return {}
    result, _ = timed_eval(model, tasks, args)
    return averages({t.name: t.score for t in result.tasks}, zoo, "gen")


def timed_eval(model, tasks, args) -> tuple[object, float]:
    start = time.monotonic()
    result = evaluate(str(model), tasks, batch_size=args.batch_size, device=args.device, bootstrap=0,
                      progress=False)
    return result, time.monotonic() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="test")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", type=Path, default=None)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--kinds", nargs="+", default=["centroid", "classifier", "oracle"])
    p.add_argument("--limit", type=int, default=None, help="test items per task")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--generation", action="store_true", help="also exact match on the generation tasks")
    args = p.parse_args()

    zoo = build_zoo(args.size, args.seed, args.cache, progress=False)
    args.out.mkdir(parents=True, exist_ok=True)
    test = load_task_set(zoo.task_files("test", "mc"), "mc", args.limit)
    trained_only = [t for t in test if t.name in zoo.trained]
    gen = load_task_set(zoo.task_files("test", "gen"), "gen", args.limit) if args.generation else []
    rows: dict[str, dict] = {}
    reference, reference_s = timed_eval(zoo.multitask, test, args)
    for name, model in [("base", zoo.base), *((f"expert:{s}", zoo.experts[s]) for s in zoo.trained)]:
        result, _ = timed_eval(model, test, args)
        rows[name] = {**averages({t.name: t.score for t in result.tasks}, zoo), **generation_row(model, zoo, gen, args)}
    rows["multitask"] = {**averages({t.name: t.score for t in reference.tasks}, zoo),
                         **generation_row(zoo.multitask, zoo, gen, args)}
    rows["multitask"]["wall_vs_one_model"] = 1.0
    for kind in args.kinds:
        recipe = args.out / f"route_{kind}.yml"
        recipe.write_text(yaml.safe_dump(route_recipe(zoo, kind), sort_keys=False), encoding="utf-8")
        start = time.monotonic()
        build_routed(recipe, args.out / f"routed_{kind}",
                     options=RouteOptions(overwrite=True, device=args.device))
        build_s = time.monotonic() - start
        tasks = trained_only if kind == "oracle" else test
        result, seconds = timed_eval(args.out / f"routed_{kind}", tasks, args)
        routed = result.settings["routed"]
        routed_gen = [t for t in gen if kind != "oracle" or t.name in zoo.trained]
        row = {**averages({t.name: t.score for t in result.tasks}, zoo),
               **generation_row(args.out / f"routed_{kind}", zoo, routed_gen, args)}
        row.update(build_s=build_s, eval_s=seconds, model_loads=routed["model_loads"],
                   routing_s=routed["routing_seconds"],
                   wall_vs_one_model=seconds / reference_s * (len(test) / len(tasks)),
                   routing_accuracy={s: routed["share_by_task"][s].get(s, 0.0) for s in zoo.trained},
                   heldout_shares={s: routed["share_by_task"][s] for s in zoo.heldout
                                   if s in routed["share_by_task"]})
        rows[f"route:{kind}"] = row
    summary = {"zoo": {"size": zoo.size, "seed": zoo.seed, "finetune_seed": zoo.finetune_seed,
                       "trained": list(zoo.trained), "heldout": list(zoo.heldout)},
               "test_items_per_task": {t.name: len(t.items) for t in test}, "rows": rows}
    (args.out / "route_zoo.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    print(f"zoo --size {zoo.size}, seed {zoo.seed}, finetune seed {zoo.finetune_seed}: multiple-choice test accuracy")
    print(f"{'row':<20} {'avg_trained':>11} {'avg_heldout':>11} {'gen_trained':>11} {'gen_heldout':>11} "
          f"{'wall/1 model':>12}")
    for name, row in rows.items():
        wall = row.get("wall_vs_one_model")
        print(f"{name:<20} {fmt(row['avg_trained']):>11} {fmt(row['avg_heldout']):>11} "
              f"{fmt(row.get('gen_trained')):>11} {fmt(row.get('gen_heldout')):>11} "
              f"{'-' if wall is None else f'{wall:.2f}x':>12}")
    for name, row in rows.items():
        if "routing_accuracy" in row:
            print(f"{name}: routing accuracy " + ", ".join(f"{s} {v:.2f}" for s, v in row["routing_accuracy"].items()))
            for s, shares in row["heldout_shares"].items():
                print(f"    held-out {s}: " + ", ".join(f"{e} {v:.2f}" for e, v in shares.items()))


if __name__ == "__main__":
    main()
