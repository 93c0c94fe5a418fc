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
    p.add_argument("--prompt-dtype", choices=("float32", "bfloat16"), default="bfloat16",
                   help="the base model's dtype while the gate prompts run: bfloat16 (default: mergekit-moe's "
                        "numerics, half the memory of float32) or float32 (more exact states, twice the memory)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_moe)

    t = subparsers.add_parser("moe-train", help="train only the routers of a mixture of experts",
                              description="Train the routers of MOE_DIR (found by exact name; everything else "
                                          "frozen) on the labelled items of task files, with a load-balancing "
                                          "loss, and write OUT_DIR. See docs/moe.md.")
    t.add_argument("moe_dir", help="the mixture of experts (a folder mergesmith moe wrote)")
    t.add_argument("out_dir", help="where to write the model with trained routers")
    t.add_argument("--data", nargs="+", required=True, help="task files (JSONL, CSV, YAML) whose labelled items "
                                                            "are the training texts: train/validation, never test")
    t.add_argument("--steps", type=int, default=100, help="optimizer steps (default 100)")
    t.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    t.add_argument("--balance", type=float, default=0.01, help="weight of the load-balancing loss (default 0.01)")
    t.add_argument("--batch-size", type=int, default=8, help="texts per step (default 8)")
    t.add_argument("--max-length", type=int, default=256, help="tokens per text, longer ones cut (default 256)")
    t.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    t.add_argument("--out-shard-size", type=parse_size, default="5GB", help="max bytes per output shard (default 5GB)")
    t.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    t.add_argument("--random-seed", type=int, default=0, help="order of the texts (default 0)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=run_moe_train)

    r = subparsers.add_parser("moe-routing", help="how often a mixture sends each skill's tokens to its expert",
                              description="Routing accuracy: for each expert, the share of its skill's tokens "
                                          "(labelled items of its task files) whose top-1 expert is that expert, "
                                          "per layer and on average.")
    r.add_argument("moe_dir", help="the mixture of experts")
    r.add_argument("--expert", nargs="+", action="append", required=True, metavar="TASK_FILE",
                   help="task files of one expert's skill; repeat once per expert, in the experts' order")
    r.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    r.add_argument("--batch-size", type=int, default=8, help="texts per forward pass (default 8)")
    r.set_defaults(func=run_moe_routing)


def run_moe(args: argparse.Namespace) -> int:
    from mergesmith.merge_cli import show_warnings
    from mergesmith.moe import MoEOptions, build_moe

    show_warnings()
    options = MoEOptions(device=args.device, out_shard_size=args.out_shard_size, overwrite=args.overwrite,
                         progress=not args.no_progress, random_seed=args.random_seed,
                         prompt_dtype=args.prompt_dtype)
    result = build_moe(args.config, args.out_dir, dry_run=args.dry_run, options=options)
    if args.dry_run:
        print(result.plan.describe())
        print("dry run: nothing written")
        return 0
    print(result.plan.describe(full=False), file=sys.stderr)
    print(f"wrote {len(result.plan.tensors)} tensors to {result.out_dir} in {result.seconds:.1f} s")
    return 0


def run_moe_train(args: argparse.Namespace) -> int:
    from mergesmith.moe.train import RouterTraining, train_routers

    options = RouterTraining(steps=args.steps, lr=args.lr, balance=args.balance, batch_size=args.batch_size,
                             max_length=args.max_length, seed=args.random_seed, device=args.device,
                             overwrite=args.overwrite, out_shard_size=args.out_shard_size,
                             progress=not args.no_progress)
    result = train_routers(args.moe_dir, args.data, args.out_dir, options=options)
    first, last = result.losses[0], result.losses[-1]
    print(f"trained {len(result.routers)} routers for {len(result.losses)} steps (loss {first:.4f} -> {last:.4f}); "
          f"wrote {result.out_dir}")
    return 0


def run_moe_routing(args: argparse.Namespace) -> int:
    from mergesmith.checks import resolve_device
    from mergesmith.moe.routing import routing_accuracy

    report = routing_accuracy(args.moe_dir, args.expert, device=resolve_device(args.device),
                              batch_size=args.batch_size)
    print(report.table())
    return 0
