"""``mergesmith dam``: learn DAM coefficients and write a recipe that merges with them."""

from __future__ import annotations

import argparse

from mergesmith.errors import InputError


def register(subparsers) -> None:
    from mergesmith.learn.dam import DamSettings

    d = DamSettings()
    p = subparsers.add_parser(
        "dam", help="learn DAM merge coefficients (Differentiable Adaptive Merging) and write a recipe",
        description="Learn one coefficient per input column, per linear layer and per model, by distilling each "
                    "expert into the merged model on the expert's own data (KL at temperature 2, plus DAM's "
                    "cosine-similarity regularizer). Writes DIR/dam_coefficients.safetensors and DIR/dam.yml "
                    "(merge_method: dam); run mergesmith merge DIR/dam.yml OUT to stream the merge. "
                    "Holds every model's full weights in memory (docs/dam.md).")
    p.add_argument("recipe", help="a recipe whose models: list names the models to merge (its method is not used)")
    p.add_argument("--data", nargs="+", required=True, metavar="EXPERT=FILES",
                   help="an expert (its reference in the recipe, its path or its folder name) and its task "
                        "files, comma-separated; one per expert")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for dam.yml and the coefficient file")
    p.add_argument("--lr", type=float, default=d.lr, help=f"learning rate (default {d.lr}, DAM's)")
    p.add_argument("--epochs", type=int, default=d.epochs, help=f"passes over the data (default {d.epochs})")
    p.add_argument("--temperature", type=float, default=d.temperature,
                   help=f"KL temperature (default {d.temperature})")
    p.add_argument("--similarity", type=float, default=d.similarity,
                   help=f"weight of the cosine-similarity regularizer (default {d.similarity})")
    p.add_argument("--mofo-alpha", type=float, default=d.mofo_alpha,
                   help=f"MoFO: fraction of each coefficient vector updated per step; 1 is AdamW "
                        f"(default {d.mofo_alpha})")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help=f"default {d.weight_decay}")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help=f"sequences of each expert per step (default {d.batch_size})")
    p.add_argument("--samples", type=int, default=d.samples, help=f"items drawn per expert (default {d.samples})")
    p.add_argument("--max-length", type=int, default=d.max_length, help=f"tokens per sequence (default {d.max_length})")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the data draw and order (default 0)")
    p.add_argument("--include-answers", action="store_true",
                   help="distill on each item's prompt followed by its gold answer (the gold choice, or the first "
                        "reference), so that the KL covers the answer tokens; every item needs one "
                        "(default: prompts only)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace dam.yml and the coefficients in DIR")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_dam_command)


def parse_data(values: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    problems = []
    for value in values:
        name, sep, files = value.partition("=")
        if not sep or not name:
            problems.append(f"--data {value}: give EXPERT=FILE[,FILE...], e.g. --data ./math=math.jsonl")
            continue
        if name in out:
            problems.append(f"--data {name}: given twice; list all its files in one --data, comma-separated")
            continue
        out[name] = [f for f in files.split(",") if f]
    if problems:
        raise InputError(problems)
    return out


def run_dam_command(args: argparse.Namespace) -> int:
    from mergesmith.checks import pick_device
    from mergesmith.learn.dam import DamSettings, run_dam

    settings = DamSettings(lr=args.lr, epochs=args.epochs, temperature=args.temperature, similarity=args.similarity,
                           mofo_alpha=args.mofo_alpha, weight_decay=args.weight_decay, batch_size=args.batch_size,
                           samples=args.samples, max_length=args.max_length, seed=args.seed,
                           include_answers=args.include_answers)
    device = str(pick_device(args.device))
    result, recipe_path, coef_path = run_dam(args.recipe, parse_data(args.data), args.out, settings, device=device,
                                             progress=not args.no_progress, overwrite=args.overwrite)
    print(f"objective (KL over the experts + regularizer): {result.objective_before:.6g} -> "
          f"{result.objective_after:.6g}; KL {result.kl_before:.6g} -> {result.kl_after:.6g} "
          f"in {len(result.losses)} steps")
    print(f"wrote {coef_path} ({len(result.names)} linear weights x {len(next(iter(result.coefficients.values())))} "
          f"models) and {recipe_path}; merge with: mergesmith merge {recipe_path} OUT")
    return 0
