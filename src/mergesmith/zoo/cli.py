"""``mergesmith zoo build``, ``mergesmith zoo competition`` and ``mergesmith bench``."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

SIZE_NAMES = ("test", "default", "medium", "large")  # as in mergesmith.zoo.model.SIZES (torch-free here)


def _add_zoo_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", default="default", choices=SIZE_NAMES,
                   help="test: seconds, for the test suite; default: about 11 minutes on two CPU "
                        "cores; medium: 11.4M parameters, for the scaling study; large: for a GPU "
                        "(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="world and base seed (default: 0)")
    p.add_argument("--cache", type=Path, default=None,
                   help="cache folder (default: $MERGESMITH_CACHE/zoo or ~/.cache/mergesmith/zoo)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: the size's own)")


def register(subparsers) -> None:
    zoo = subparsers.add_parser("zoo", help="the model zoo: a base, experts and task files we train ourselves")
    zoo_sub = zoo.add_subparsers(dest="zoo_command", required=True, metavar="ZOO_COMMAND")
    build = zoo_sub.add_parser("build", help="build the zoo, or reuse the cached one, and print where it is")
    _add_zoo_options(build)
    build.add_argument("--finetune-seed", type=int, default=None,
                       help="seed of the fine-tuning only (default: --seed); same base and tasks")
    build.add_argument("--rebuild", action="store_true", help="delete this zoo's cache entry first")
    build.add_argument("--json", action="store_true", help="print the manifest as JSON")
    build.set_defaults(func=run_build)
    pool = zoo_sub.add_parser("pool", help="list the expert pool (experts, LoRA experts, distractors), "
                                           "building the zoo if needed")
    _add_zoo_options(pool)
    pool.add_argument("--finetune-seed", type=int, default=None, help="seed of the fine-tuning only")
    pool.add_argument("--json", action="store_true", help="print the pool as JSON")
    pool.set_defaults(func=run_pool)

    comp = zoo_sub.add_parser("competition", help="write the zoo's tasks as LLM Merging Competition CSV files",
                              description="Write the zoo's validation and test tasks (every skill, trained and "
                                          "held-out; multiple choice and generation rows mixed) as the competition's "
                                          "CSV files: DIR/validation.csv (with targets), DIR/test.csv (hidden: no "
                                          "target column) and DIR/test_key.csv (its answers, for mergesmith score). "
                                          "Builds the zoo first, or reuses the cached one.")
    _add_zoo_options(comp)
    comp.add_argument("--finetune-seed", type=int, default=None,
                      help="the zoo entry to reuse (default: --seed); the task files do not depend on it")
    comp.add_argument("--out", required=True, type=Path, metavar="DIR", help="where to write the three files")
    comp.add_argument("--overwrite", action="store_true", help="replace the files if they exist")
    comp.set_defaults(func=run_competition)

    from mergesmith.zoo.bench import add_bench_parser

    add_bench_parser(subparsers, _add_zoo_options)


def run_build(args) -> int:
    from mergesmith.zoo.build import build_zoo

    start = time.time()
    zoo = build_zoo(args.size, args.seed, args.cache, finetune_seed=args.finetune_seed,
                    device=args.device, rebuild=args.rebuild)
    if args.json:
        print(json.dumps(zoo.manifest, indent=2))
        return 0
    print(f"zoo ({zoo.size}, seed {zoo.seed}, fine-tune seed {zoo.finetune_seed}) ready in "
          f"{time.time() - start:.0f}s at {zoo.root}")
    print(f"  base       {zoo.base}")
    for skill, path in zoo.experts.items():
        print(f"  expert     {skill:12s} {path}")
    for skill, path in zoo.lora.items():
        print(f"  lora       {skill:12s} {path}")
    print(f"  multitask  {zoo.multitask}")
    for name, path in zoo.distractors.items():
        print(f"  distractor {name:12s} {path}")
    print(f"  tasks      {zoo.tasks['test']['mc'][zoo.trained[0]].parent.parent.parent}"
          "/<split>/<mc|gen>/<skill>.jsonl")
    print(f"  held-out skills: {', '.join(zoo.heldout)}")
    return 0


def run_pool(args) -> int:
    from mergesmith.zoo.build import build_zoo

    zoo = build_zoo(args.size, args.seed, args.cache, finetune_seed=args.finetune_seed, device=args.device)
    members = zoo.pool
    if args.json:
        print(json.dumps([m.as_dict() for m in members], indent=2))
        return 0
    width = max(len(m.name) for m in members)
    for m in members:
        flag = "" if m.clean else "  (distractor: a careful user would not merge it)"
        print(f"{m.name:{width}s}  {m.doc}{flag}\n{'':{width}s}  {m.path}")
    return 0


def run_competition(args) -> int:
    from mergesmith.errors import InputError
    from mergesmith.zoo.build import build_zoo
    from mergesmith.zoo.competition import competition_problems, write_competition

    problems = competition_problems(args.out, args.overwrite)  # before minutes of building a zoo
    if problems:
        raise InputError(problems)
    zoo = build_zoo(args.size, args.seed, args.cache, finetune_seed=args.finetune_seed, device=args.device)
    written = write_competition(zoo, args.out, overwrite=args.overwrite)
    print(f"competition files of the zoo ({zoo.size}, seed {zoo.seed}) in {args.out}:")
    for f in written:
        print(f"  {f.path.name:<15} {f.rows:5d} rows: {f.multiple_choice} multiple choice, {f.generation} generation")
    test = next(f for f in written if f.path.name == "test.csv")
    held = set(zoo.heldout)
    print("  test rows per skill (multiple choice + generation):")
    for skill, (mc, gen) in test.per_skill.items():
        print(f"    {skill:<14} {mc:3d} + {gen:3d}" + ("  (held-out)" if skill in held else ""))
    print(f"score a submission with: mergesmith score SUBMISSION.csv --key {Path(args.out) / 'test_key.csv'}")
    return 0
