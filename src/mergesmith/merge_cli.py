"""``mergesmith merge`` and ``mergesmith methods``."""

from __future__ import annotations

import argparse
import sys
import warnings

from mergesmith.errors import InputError
from mergesmith.units import parse_size


def add_merge_options(p: argparse.ArgumentParser) -> None:
    """The flags that set ``MergeOptions`` (but --overwrite, which each command words its own way), shared
    with ``mergesmith multi``."""
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch threads for the math (default: torch's)")
    p.add_argument("--out-shard-size", type=parse_size, default="5GB", help="max bytes per output shard (default 5GB)")
    p.add_argument("--prefetch", type=parse_size, default="128MiB",
                   help="how many bytes of inputs may be read ahead of the math (default 128MiB; the next tensor is always read ahead)")
    p.add_argument("--chunk", type=parse_size, default="64MiB",
                   help="merge a tensor whose inputs exceed this in blocks of rows of about this size, where the "
                        "method's math allows it (default 64MiB; 0 merges every tensor whole)")
    p.add_argument("--vocab-mismatch", choices=("resize", "error"), default="resize",
                   help="models with different vocabulary sizes: resize to the output's with a warning, or stop")
    p.add_argument("--random-seed", type=int, default=None, help="overrides the recipe's random_seed")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="carry NaN/Inf values in inputs or outputs through with a warning (default: stop with an error)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def merge_options(args: argparse.Namespace) -> "MergeOptions":
    """``MergeOptions`` from the flags ``add_merge_options`` adds."""
    from mergesmith.engine.options import MergeOptions

    return MergeOptions(device=args.device, threads=args.threads, out_shard_size=args.out_shard_size,
                        overwrite=args.overwrite, vocab_mismatch=args.vocab_mismatch,
                        prefetch_bytes=args.prefetch, chunk_bytes=args.chunk, progress=not args.no_progress,
                        random_seed=args.random_seed, allow_nonfinite=args.allow_nonfinite)


def register(subparsers) -> None:
    p = subparsers.add_parser("merge", help="merge models as a recipe says",
                              description="Merge the models a mergekit-style YAML recipe names into OUT_DIR.")
    p.add_argument("recipe", help="the recipe (mergekit YAML)")
    p.add_argument("out_dir", help="where to write the merged model (a Hugging Face model folder)")
    p.add_argument("--dry-run", action="store_true",
                   help="validate and print the plan (every output tensor, its inputs, memory and bytes), write nothing")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    add_merge_options(p)
    p.set_defaults(func=run_merge)

    m = subparsers.add_parser("methods", help="list merge methods and their parameters")
    m.add_argument("name", nargs="?", help="show one method")
    m.set_defaults(func=run_methods)


def show_warnings() -> None:
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"warning: {message}", file=sys.stderr)
    warnings.showwarning = show


def run_merge(args: argparse.Namespace) -> int:
    from mergesmith.api import merge

    show_warnings()
    options = merge_options(args)
    result = merge(args.recipe, args.out_dir, dry_run=args.dry_run, options=options)
    if args.dry_run:
        print(result.plan.describe(options))
        print("dry run: nothing written")
        return 0
    print(result.plan.describe(options, full=False), file=sys.stderr)
    print(f"wrote {result.tensors_written} tensors to {result.out_dir} in {result.seconds:.1f} s")
    return 0


def run_methods(args: argparse.Namespace) -> int:
    from mergesmith.methods import all_methods

    methods = all_methods()
    if args.name:
        if args.name not in methods:
            raise InputError(f"{args.name!r} is not a known method; choose one of: {', '.join(methods)}")
        methods = {args.name: methods[args.name]}
    for spec in methods.values():
        flags = [f"base {spec.base.value}"] + (["stochastic"] if spec.stochastic else [])
        if spec.needs_stats:
            flags.append(f"needs calibration: {', '.join(spec.needs_stats)}")
        print(f"{spec.name}  ({', '.join(flags)})  {spec.summary}")
        if spec.reference:
            print(f"    {spec.reference}")
        for p in spec.params:
            default = "required" if p.required else f"default {p.default!r}"
            scope = "per model" if p.per_model else "global"
            rng = f", range {p.range_text()}" if p.low is not None or p.high is not None else ""
            print(f"    {p.name}: {p.kind.__name__}, {scope}, {default}{rng}" + (f" - {p.doc}" if p.doc else ""))
    return 0
