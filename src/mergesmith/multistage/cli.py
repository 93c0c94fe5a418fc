"""``mergesmith multi``: a multi-stage recipe (mergekit-multi's format) merged stage by stage."""

from __future__ import annotations

import argparse
import sys

from mergesmith.merge_cli import add_merge_options, merge_options, show_warnings


def register(subparsers) -> None:
    p = subparsers.add_parser("multi", help="merge a multi-stage recipe (mergekit-multi's format)",
                              description="Merge the stages of a multi-stage recipe (YAML documents separated by "
                                          "---, each a recipe with a name:, the final one without) in order; a "
                                          "stage reads an earlier one by its name. Intermediates are cached by a "
                                          "key of their recipe and inputs. See docs/multistage.md.")
    p.add_argument("recipe", help="the multi-stage recipe (YAML documents)")
    p.add_argument("out_dir", help="where to write the final stage's model")
    p.add_argument("-I", "--intermediate-dir", default=None,
                   help="where intermediates are written and looked up (default: OUT_DIR.stages beside OUT_DIR)")
    p.add_argument("--keep-intermediates", action="store_true",
                   help="keep the intermediates this run makes, so that a later run reuses those whose key matches")
    p.add_argument("--dry-run", action="store_true",
                   help="check every stage and print the plan (order, inputs, cache keys, cached or not), write nothing")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists (intermediates never are)")
    add_merge_options(p)
    p.set_defaults(func=run_multi_command)


def run_multi_command(args: argparse.Namespace) -> int:
    from mergesmith.multistage import run_multi

    show_warnings()
    result = run_multi(args.recipe, args.out_dir, options=merge_options(args),
                       intermediate_dir=args.intermediate_dir, keep_intermediates=args.keep_intermediates,
                       dry_run=args.dry_run)
    if args.dry_run:
        print(result.plan.describe())
        print("dry run: nothing written")
        return 0
    for sp in result.plan.stages:
        done = "reused" if (sp.stage.name or "") in result.reused else "merged"
        gone = " (removed)" if sp.out_dir in result.removed else ""
        print(f"{sp.stage.title}: {done}, key {sp.key[:16]}, {sp.out_dir}{gone}", file=sys.stderr)
    kept = "" if args.keep_intermediates else f"; removed {len(result.removed)} intermediates"
    print(f"merged {len(result.ran)} stages, reused {len(result.reused)} cached{kept}; wrote {args.out_dir} "
          f"in {result.seconds:.1f} s")
    return 0
