"""``mergesmith route ROUTE.yml OUT``: a routed model folder from a routing recipe."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("route", help="build a routed model: a router that sends each prompt to an expert",
                              description="Fit the router a routing recipe describes and write a routed model "
                                          "folder OUT, which evaluate and compete take like a model. "
                                          "See docs/route.md.")
    p.add_argument("recipe", help="the routing recipe (YAML): experts, fallback, router kind, data")
    p.add_argument("out_dir", help="where to write the routed model folder")
    p.add_argument("--copy", action="store_true",
                   help="copy every model into OUT, so that the folder is self-contained")
    p.add_argument("--device", default="cpu", help="where the base model and the experts run (default: cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_route)


def run_route(args: argparse.Namespace) -> int:
    from mergesmith.checks import device_problems, resolve_device
    from mergesmith.errors import InputError
    from mergesmith.route.build import RouteOptions, build_routed

    problems = device_problems(args.device)
    if problems:
        raise InputError(problems)
    options = RouteOptions(copy=args.copy, overwrite=args.overwrite, device=resolve_device(args.device) or "cpu",
                           progress=not args.no_progress)
    routed = build_routed(args.recipe, args.out_dir, options=options)
    names = ", ".join(e.name for e in routed.experts)
    extra = f"; fallback below confidence {routed.threshold:.4f}" if routed.threshold is not None else ""
    print(f"wrote {routed.folder}: {routed.kind} router over {len(routed.experts)} experts ({names}){extra}")
    if routed.kind == "perplexity":
        print(f"note: the perplexity router runs every expert on every prompt: {len(routed.experts)} forward "
              "passes per item before the answering one")
    if routed.kind == "oracle":
        print("note: the oracle sends each task to the expert named for it: an upper bound, not a router")
    return 0
