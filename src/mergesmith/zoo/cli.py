"""``mergesmith zoo build`` and ``mergesmith bench``."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

SIZE_NAMES = ("test", "default", "medium", "large")  # as in mergesmith.zoo.model.SIZES (torch-free here)


def _add_zoo_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", default="default", choices=SIZE_NAMES,
                   help="test: seconds, for the test suite; default: about 10 minutes on two CPU "
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
