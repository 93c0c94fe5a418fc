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

    e = subparsers.add_parser("extract-lora", help="extract a PEFT LoRA adapter from a fine-tune and its base",
                              description="Write the truncated SVD of each changed weight (fine-tune minus base) "
                                          "as a PEFT LoRA adapter in OUT_DIR; options follow mergekit-extract-lora. "
                                          "See docs/lora.md.")
    e.add_argument("out_dir", help="where to write the adapter")
    e.add_argument("--model", required=True, help="the fine-tuned model folder")
    e.add_argument("--base-model", required=True, help="its base model folder")
    e.add_argument("--max-rank", type=int, default=128, help="largest rank of a module (default: %(default)s)")
    e.add_argument("--energy", type=float, default=None,
                   help="keep the fewest singular values holding this share (0, 1] of each module's sum S_i^2")
    e.add_argument("--sv-epsilon", type=float, default=0.0,
                   help="drop singular values at or below this (default: %(default)s)")
    e.add_argument("-i", "--include-regex", action="append", default=[],
                   help="extract only modules whose name matches (repeatable)")
    e.add_argument("-e", "--exclude-regex", action="append", default=[], help="leave out matching modules (repeatable)")
    e.add_argument("--embed-lora", action="store_true",
                   help="extract the embeddings and LM head as LoRA (default: save them whole in modules_to_save)")
    e.add_argument("--save-module", action="append", default=[],
                   help="save this module whole, in modules_to_save (a full name or its last part; repeatable)")
    e.add_argument("--skip-undecomposable", action="store_true",
                   help="leave out changed tensors that are not matrices (norms) instead of saving them whole")
    e.add_argument("--skip-bias", action="store_true",
                   help="leave out changed biases of extracted modules (default: carry them as lora_B.bias where "
                        "PEFT can fold them, else stop and say so)")
    e.add_argument("--svd", choices=("auto", "exact", "randomized"), default="auto",
                   help="exact: a full thin SVD per module; randomized: subspace iteration for the leading "
                        "max-rank + 16 singular triplets (the error reported is measured on what is "
                        "written); auto (default): randomized where max-rank + 16 is at most a quarter of "
                        "the module's smaller side")
    e.add_argument("--out-dtype", default=None, help="float32, bfloat16 or float16 (default: the fine-tune's)")
    e.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.set_defaults(func=run_extract_lora)


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


def run_extract_lora(args: argparse.Namespace) -> int:
    from mergesmith.checkpoint.reader import dtype_from_name
    from mergesmith.errors import InputError
    from mergesmith.lora.extract import ExtractOptions, extract_lora
    from mergesmith.lora.merge import describe_errors

    out_dtype = None
    if args.out_dtype is not None:
        try:
            out_dtype = dtype_from_name(args.out_dtype)
        except (KeyError, ValueError, InputError):
            raise InputError(f"--out-dtype {args.out_dtype!r}: use float32, bfloat16 or float16") from None
    options = ExtractOptions(max_rank=args.max_rank, energy=args.energy, sv_epsilon=args.sv_epsilon,
                             include=tuple(args.include_regex), exclude=tuple(args.exclude_regex),
                             embed_lora=args.embed_lora, save_modules=tuple(args.save_module),
                             skip_undecomposable=args.skip_undecomposable, skip_bias=args.skip_bias, svd=args.svd,
                             out_dtype=out_dtype,
                             overwrite=args.overwrite, progress=not args.no_progress)
    result = extract_lora(args.model, args.base_model, args.out_dir, options)
    worst = describe_errors(result.report)
    if worst:
        print(f"largest truncation errors (relative Frobenius; all in mergesmith_report.json):\n{worst}",
              file=sys.stderr)
    if result.dropped:
        print(f"left out (--include/--exclude-regex, --skip-undecomposable): {len(result.dropped)} tensors, "
              f"e.g. {result.dropped[0]}", file=sys.stderr)
    print(f"wrote an adapter of {len(result.report)} LoRA modules and {len(result.saved)} whole tensors to "
          f"{result.out_dir} in {result.seconds:.1f} s")
    return 0
