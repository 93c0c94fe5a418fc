"""``mergesmith merge-lora`` and ``mergesmith extract-lora``: LoRA adapters in adapter space."""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    m = subparsers.add_parser("merge-lora", help="merge PEFT LoRA adapters into one adapter",
                              description="Merge the PEFT LoRA adapters a recipe lists (one base model) into "
                                          "a PEFT adapter folder OUT_DIR; see docs/lora.md.")
    m.add_argument("recipe", help="the recipe (YAML: merge_method concat or a registry method, models: adapters)")
    m.add_argument("out_dir", help="where to write the merged adapter (adapter_config.json, adapter_model.safetensors)")
    m.add_argument("--dry-run", action="store_true", help="validate and list the output modules, write nothing")
    m.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    m.add_argument("--no-progress", action="store_true", help="no progress bar")
    m.set_defaults(func=run_merge_lora)


def run_merge_lora(args: argparse.Namespace) -> int:
    from mergesmith.lora.merge import describe_errors, merge_lora, plan_lora_merge

    if args.dry_run:
        plan = plan_lora_merge(args.recipe, args.out_dir)
        for module in plan.modules:
            ranks = [plan.adapters[i].modules[module.name].rank for i in module.sources]
            print(f"{module.name}  {list(module.shape)}  from {len(module.sources)} adapter(s), ranks {ranks}")
        kind = "exact concatenation" if plan.exact else f"{plan.method.name}, truncated per module"
        print(f"{len(plan.modules)} modules, {kind}; dry run: nothing written")
        return 0
    result = merge_lora(args.recipe, args.out_dir, overwrite=args.overwrite, progress=not args.no_progress)
    worst = describe_errors(result.report)
    if worst:
        print(f"largest truncation errors (relative Frobenius; all in mergesmith_report.json):\n{worst}",
              file=sys.stderr)
    print(f"wrote an adapter of {result.modules} modules to {result.out_dir} in {result.seconds:.1f} s")
    return 0
