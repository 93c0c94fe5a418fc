"""``mergesmith moe CONFIG OUT``: a mixture of experts from a mergekit-moe YAML."""

from __future__ import annotations

import argparse
import sys

from mergesmith.units import parse_size


def register(subparsers) -> None:
    p = subparsers.add_parser("moe", help="build a mixture of experts from dense experts (mergekit-moe YAML)",
                              description="Build the mixture of experts a mergekit-moe YAML config describes "
                                          "into OUT_DIR (Mixtral, Qwen2-MoE or Qwen3-MoE). See docs/moe.md.")
    p.add_argument("config", help="the mergekit-moe YAML config")
    p.add_argument("out_dir", help="where to write the model (a Hugging Face model folder)")
    p.add_argument("--device", default="cpu", help="where the gate prompts run: cpu, cuda, cuda:N or auto "
                                                   "(default: cpu)")
    p.add_argument("--out-shard-size", type=parse_size, default="5GB", help="max bytes per output shard (default 5GB)")
    p.add_argument("--dry-run", action="store_true",
                   help="check everything and print the plan (every output tensor, its source, the predicted "
                        "peak memory); read no weight, write nothing")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p.add_argument("--random-seed", type=int, default=0,
                   help="seed of random gates and of experts' noise_scale noise (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_moe)


def run_moe(args: argparse.Namespace) -> int:
    from mergesmith.merge_cli import _show_warnings
    from mergesmith.moe import MoEOptions, build_moe

    _show_warnings()
    options = MoEOptions(device=args.device, out_shard_size=args.out_shard_size, overwrite=args.overwrite,
                         progress=not args.no_progress, random_seed=args.random_seed)
    result = build_moe(args.config, args.out_dir, dry_run=args.dry_run, options=options)
    if args.dry_run:
        print(result.plan.describe())
        print("dry run: nothing written")
        return 0
    print(result.plan.describe(full=False), file=sys.stderr)
    print(f"wrote {len(result.plan.tensors)} tensors to {result.out_dir} in {result.seconds:.1f} s")
    return 0
