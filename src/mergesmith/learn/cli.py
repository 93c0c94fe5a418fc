"""``mergesmith adamerge``: learn AdaMerging coefficients and write them as a recipe."""

from __future__ import annotations

import argparse

from mergesmith.learn.adamerging import GRANULARITIES, AdaMergingSettings, side_files


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "adamerge", help="learn task-vector weights by entropy minimization (AdaMerging) and write a recipe",
        description="AdaMerging (Yang et al., ICLR 2024): learn the weights of the task vectors of RECIPE "
                    "(task_arithmetic, or ties with --prune) by minimizing the prediction entropy of the merged "
                    "model on the unlabeled prompts of --tasks (answers are never read). Writes a recipe that "
                    "mergesmith merge (and mergekit-yaml) runs, a PNG of the weights per layer and a JSON trace "
                    "beside it. See docs/learn.md.")
    p.add_argument("recipe", help="a task_arithmetic (or ties) recipe with base_model and models:")
    p.add_argument("--tasks", nargs="+", required=True, metavar="FILE",
                   help="task files whose prompts are the unlabeled data (JSONL, competition CSV, YAML task config)")
    p.add_argument("--out", required=True, help="the learned recipe (.yml); .png and .json are written beside it")
    p.add_argument("--granularity", choices=GRANULARITIES, default="layer",
                   help="layer: one weight per model and decoder layer, one more for embeddings/norm/lm_head "
                        "(default); task: one weight per model")
    p.add_argument("--prune", action="store_true",
                   help="AdaMerging++: learn on TIES-trimmed, sign-elected task vectors (the recipe's density) "
                        "and write a ties recipe")
    p.add_argument("--steps", type=int, default=1000, help="Adam steps (default 1000)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3, the paper's)")
    p.add_argument("--init", type=float, default=0.3, help="initial weight of every task vector (default 0.3)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per task per step (default 16)")
    p.add_argument("--samples", type=int, default=None, help="prompts drawn per task (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seeds the draw and the batch order (default 0)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out and its .png/.json")
    p.add_argument("--no-plot", action="store_true", help="no PNG (then matplotlib is not needed)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_adamerge)


def run_adamerge(args: argparse.Namespace) -> int:
    from mergesmith.learn.adamerging import adamerge

    settings = AdaMergingSettings(granularity=args.granularity, prune=args.prune, steps=args.steps, lr=args.lr,
                                  init=args.init, batch_size=args.batch_size, samples=args.samples,
                                  seed=args.seed, device=args.device, progress=not args.no_progress)
    result = adamerge(args.recipe, args.tasks, args.out, settings, overwrite=args.overwrite, plot=not args.no_plot)
    png, trace = side_files(args.out)
    print(f"entropy objective: {result.objective_before:.4f} at weight {settings.init:g}, "
          f"{result.objective_after:.4f} learned ({settings.steps} steps)")
    print(f"wrote {args.out}" + ("" if args.no_plot else f", {png}") + f", {trace}")
    print(f"next: mergesmith merge {args.out} OUT_DIR")
    return 0
