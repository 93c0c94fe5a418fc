"""The competition flow with a routed model, beside merges: ``zoo competition`` -> ``compete`` ->
``score``, each step the CLI a user runs, as whole processes.

1. ``mergesmith zoo competition`` writes the zoo's tasks as the competition's CSV files
   (``validation.csv``, the hidden ``test.csv`` and its key ``test_key.csv``);
2. a routing recipe (one expert per trained skill, each fitted on its skill's whole train split,
   no fallback) and one merge recipe per ``--merge`` are written from the zoo;
3. ``mergesmith compete RECIPE --tasks test.csv --budget B`` runs each (the routed model's router
   is fitted inside the budget, as a merge is run inside it);
4. ``mergesmith score submission.csv --key test_key.csv`` scores each submission.

Printed as a table and written to ``--out``/competition_flow.json, with each compete run's phase
times and, for the routed run, its routing report (model loads, routing seconds).

    .venv/bin/python benchmarks/bench_route_competition.py --out out/comp-flow \\
        --merge tsv_m:lambda=2.0 --merge ties:density=0.2,lambda=1.5

The merges' hyperparameters are arguments: give the ones ``mergesmith bench`` chose on validation
for the same zoo (``results.json: seeds[k].chosen``); the defaults are those it chose for the
default zoo, world seed 0, fine-tune seed 0.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

from mergesmith.zoo.bench_route import route_recipe
from mergesmith.zoo.build import build_zoo

DEFAULT_MERGES = ["tsv_m:lambda=2.0", "ties:density=0.2,lambda=1.5"]


def merge_recipe(zoo, spec: str) -> tuple[str, dict]:
    """``method:key=value,...`` -> (row name, recipe over the zoo's trained experts)."""
    method, _, rest = spec.partition(":")
    params = {k: float(v) for k, v in (kv.split("=", 1) for kv in rest.split(",") if kv)}
    top = {k: v for k, v in params.items() if k == "lambda"}
    per_model = {k: v for k, v in params.items() if k != "lambda"}
    recipe = {"merge_method": method, "base_model": str(zoo.base), "dtype": "float32",
              "models": [{"model": str(zoo.experts[s]), "parameters": {"weight": 1.0, **per_model}}
                         for s in zoo.trained]}
    if top:
        recipe["parameters"] = top
    return f"merge:{method}", recipe


def cli(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "mergesmith", *args], capture_output=True, text=True)
    return done, time.monotonic() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="default")
    p.add_argument("--seed", type=int, default=0, help="the zoo's world seed")
    p.add_argument("--finetune-seed", type=int, default=None, help="default: --seed")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--kind", default="classifier", help="router kind of the routed row (default classifier)")
    p.add_argument("--merge", action="append", default=None, metavar="METHOD:K=V,...",
                   help=f"a merge row (repeat); default: {' and '.join(DEFAULT_MERGES)}")
    p.add_argument("--budget", default="1h", help="each compete run's budget (default 1h)")
    args = p.parse_args()

    zoo = build_zoo(args.size, args.seed, finetune_seed=args.finetune_seed, progress=False)
    args.out.mkdir(parents=True, exist_ok=True)
    comp = args.out / "comp"
    done, _ = cli("zoo", "competition", "--size", args.size, "--seed", str(args.seed), "--finetune-seed",
                  str(zoo.finetune_seed), "--out", str(comp), "--overwrite")
    if done.returncode:
        sys.exit(f"zoo competition failed:\n{done.stderr}")
    rows = {f"route:{args.kind}": route_recipe(zoo, args.kind)}
    rows.update(merge_recipe(zoo, spec) for spec in (args.merge or DEFAULT_MERGES))
    report = {"zoo": {"size": zoo.size, "seed": zoo.seed, "finetune_seed": zoo.finetune_seed},
              "budget": args.budget, "rows": {}}
    for name, recipe in rows.items():
        slug = name.replace(":", "_")
        path = args.out / f"{slug}.yml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
        run = args.out / f"run_{slug}"
        done, seconds = cli("compete", str(path), "--tasks", str(comp / "test.csv"), "--budget", args.budget,
                            "--out", str(run), "--overwrite", "--no-progress", "--bootstrap", "0")
        if done.returncode:
            sys.exit(f"compete {name} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        scored, _ = cli("score", str(run / "submission.csv"), "--key", str(comp / "test_key.csv"), "--json")
        if scored.returncode:
            sys.exit(f"score {name} failed:\n{scored.stderr}")
        compete = json.loads((run / "compete.json").read_text())
        report["rows"][name] = {"score": json.loads(scored.stdout), "compete_wall_s": round(seconds, 1),
                                "phases": compete.get("phases"), "routed": compete.get("routed")}
    (args.out / "competition_flow.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"zoo --size {zoo.size}, seed {zoo.seed}, fine-tune seed {zoo.finetune_seed}; mergesmith score on "
          f"{comp / 'test.csv'}")
    print(f"{'submission':<22} {'multiple choice':>15} {'gen ROUGE-L':>11} {'gen exact':>9} {'overall':>8} "
          f"{'compete s':>9}")
    for name, row in report["rows"].items():
        s = row["score"]
        mc, gen = s["by_type"]["multiple_choice"], s["by_type"]["generation"]
        print(f"{name:<22} {mc['score']:>15.4f} {gen['metrics']['rougeL']:>11.4f} "
              f"{gen['metrics'].get('exact_match', float('nan')):>9.4f} {s['overall']:>8.4f} "
              f"{row['compete_wall_s']:>9.1f}")


if __name__ == "__main__":
    main()
