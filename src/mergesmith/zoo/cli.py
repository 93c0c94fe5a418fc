"""``mergesmith zoo build``, ``mergesmith zoo competition`` and ``mergesmith bench``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

from mergesmith.errors import InputError

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


# ----------------------------------------------------------------------------- mergesmith bench


def add_bench_parser(subparsers, add_zoo_options: Callable) -> None:
    from mergesmith.zoo.bench import ALL_METHODS, DATA_AWARE_METHODS, DEMO_METHODS

    p = subparsers.add_parser("bench", help="merge the zoo's experts with every method and "
                                            "tabulate accuracy per task")
    add_zoo_options(p)
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: runs/bench, or runs/<study> with --study)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="fine-tune seeds of the zoo; the spread over them is reported "
                        "(default: 0; use three or more for the ranking's uncertainty)")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated merge methods, 'all' (the training-free ones: {', '.join(ALL_METHODS)}), "
                        f"'data-aware' ({', '.join(DATA_AWARE_METHODS)}), 'everything' (both) or "
                        f"'demo' ({', '.join(DEMO_METHODS)}) (default: all; with --study scaling: "
                        "linear,task_arithmetic,ties)")
    p.add_argument("--limit", type=int, default=None, help="test items per task (default: all)")
    p.add_argument("--val-limit", type=int, default=None,
                   help="validation items per task for choosing hyperparameters (default: all)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--routers", default="", metavar="KINDS",
                   help="comma-separated router kinds (centroid, classifier, perplexity, oracle): add a route:<kind> "
                        "row per kind, a router over the full experts fitted on their train splits, with routing "
                        "accuracy, held-out shares and wall time; oracle is the upper bound (docs/route.md)")
    p.add_argument("--moe", default="", metavar="KINDS",
                   help="comma-separated mixture-of-experts rows (hidden, ridge, trained, trained+shared-ties): add "
                        "a moe:<kind> row per kind, the experts as one Mixtral, top-2, gates from their train splits, "
                        "with routing accuracy and cost (docs/moe.md)")
    p.add_argument("--lora", default="", metavar="ROWS",
                   help="'all' or comma-separated LoRA rows (pool, concat, ties, knots_ties, core_ties, core_tsv, "
                        "fold_ties, fold_tsv_m, extract): the zoo's LoRA pool merged in adapter space and as folded "
                        "models, the experts extracted as adapters at three ranks (docs/lora.md)")
    p.add_argument("--vocab", default="", metavar="ROWS",
                   help="'all' or comma-separated vocabulary rows (experts, union, base, shared, surgeon): the zoo's "
                        "two experts with tokenizers of their own, merged with tokenizer_source union or base against "
                        "the one-tokenizer merge, and the retokenized one given the base's tokenizer back by "
                        "tokensurgeon (docs/vocab.md)")
    p.add_argument("--no-generation", action="store_true",
                   help="skip the generation table (multiple choice only)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (the log lines stay)")
    p.add_argument("--calibration-answers", action="store_true",
                   help="the data-aware rows (regmean, regmean_plusplus, fisher, dam) calibrate on each expert's "
                        "train prompts followed by their answers, as the experts were fine-tuned, not on prompts "
                        "alone (calibration.include_answers, docs/calibrate.md); adamerging stays on unlabeled "
                        "prompts (default: prompts only)")
    study = p.add_argument_group("studies", "instead of the table, a study over zoo sizes (docs/zoo.md)")
    study.add_argument("--study", choices=("scaling",), default=None,
                       help="scaling: normalized held-in accuracy and held-out gain against the number "
                            "of merged experts, per zoo size (after Yadav et al., 2024)")
    study.add_argument("--sizes", default="test,default,medium",
                       help="comma-separated zoo sizes of the study (default: %(default)s)")
    study.add_argument("--expert-counts", default="2,4,8",
                       help="comma-separated numbers of merged experts (default: %(default)s)")
    study.add_argument("--subsets", type=int, default=2,
                       help="seeded draws of k experts for each k below eight (default: %(default)s)")
    p.set_defaults(func=run_bench_cli)


def _int_list(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise InputError(f"{flag}: {text!r} is not a comma-separated list of whole numbers") from None


def run_study_cli(args: argparse.Namespace) -> int:
    from mergesmith.zoo.bench import parse_methods
    from mergesmith.zoo.study import STUDY_METHODS, StudyConfig, run_study

    if len(args.seeds) != 1:
        raise InputError("--seeds: the scaling study uses one fine-tune seed; its spread comes from the "
                         "draws of experts (--subsets)")
    if args.calibration_answers:
        raise InputError("--calibration-answers: the scaling study does not take it; it applies to the bench "
                         "table's data-aware rows (drop --study, or drop --calibration-answers)")
    cfg = StudyConfig(out=args.out or Path("runs") / args.study,
                      sizes=tuple(s.strip() for s in args.sizes.split(",") if s.strip()),
                      counts=_int_list(args.expert_counts, "--expert-counts"),
                      methods=parse_methods(args.methods) if args.methods else STUDY_METHODS,
                      subsets=args.subsets, zoo_seed=args.seed, seed=args.seeds[0], cache=args.cache,
                      device=args.device or "cpu", limit=args.limit, val_limit=args.val_limit,
                      batch_size=args.batch_size, command="mergesmith " + " ".join(sys.argv[1:]))
    text = run_study(cfg)
    print(text)
    print(f"wrote {cfg.out}/study.md, scaling.csv, heldin.png, heldout.png, results.json")
    return 0


def run_bench_cli(args: argparse.Namespace) -> int:
    from mergesmith.zoo.bench import BenchConfig, parse_methods, run_bench
    from mergesmith.zoo.bench_lora import LoraRows, parse_lora_rows
    from mergesmith.zoo.bench_moe import parse_moe
    from mergesmith.zoo.bench_route import parse_routers
    from mergesmith.zoo.bench_vocab import VocabRows, parse_vocab_rows
    from mergesmith.zoo.model import SIZES

    if args.study:
        return run_study_cli(args)
    cfg = BenchConfig(out=args.out or Path("runs/bench"), size=args.size, zoo_seed=args.seed, seeds=tuple(args.seeds),
                      methods=parse_methods(args.methods or "all"), cache=args.cache,
                      device=args.device or SIZES[args.size].device, limit=args.limit, val_limit=args.val_limit,
                      batch_size=args.batch_size, generation=not args.no_generation,
                      calibration_answers=args.calibration_answers, routers=parse_routers(args.routers),
                      extra_rows=((LoraRows(parse_lora_rows(args.lora)),) if args.lora else ())
                      + ((VocabRows(parse_vocab_rows(args.vocab)),) if args.vocab else ()),
                      moe=parse_moe(args.moe), progress=not args.no_progress,
                      command="mergesmith " + " ".join(sys.argv[1:]))
    text = run_bench(cfg)
    print(text)
    print(f"wrote {cfg.out}/table.md, table.csv, table_generation.csv, accuracy.png, results.json")
    return 0
