"""The ``mergesmith`` command. Thin: parse arguments, call the library, print.

Exit codes: 0 done, 2 bad recipe or input (an ``InputError``), 3 ``compete`` ran out of
budget before everything was scored (its outputs are still written), 1 anything else.
Each area registers its own subcommands through a ``register(subparsers)`` function.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from mergesmith.errors import InputError

AREAS = ("mergesmith.merge_cli", "mergesmith.evaluate.cli", "mergesmith.zoo.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mergesmith",
                                     description="Merge language models without training.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for area in AREAS:
        importlib.import_module(area).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
