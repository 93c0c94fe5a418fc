"""The ``mergesmith`` command. Thin: parse arguments, call the library, print.

Exit codes: 0 done; 2 a user error (bad recipe, input, argument: an ``InputError`` or an
argparse error); 3 ``compete`` ran out of budget before everything was scored (its
outputs are still written); 1 an environment fault (full disk, read-only or forbidden
path, out of memory: ``ResourceError``/``OSError``/``MemoryError``) or a bug; 130
interrupted. None of them prints a traceback unless ``--debug`` is given.
SIGTERM is handled like Ctrl-C, so that a stopped run removes what it was writing.
Each area registers its own subcommands through a ``register(subparsers)`` function.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading

from mergesmith.errors import InputError, ResourceError

AREAS = ("mergesmith.merge_cli", "mergesmith.calibrate.cli", "mergesmith.evaluate.cli", "mergesmith.zoo.cli",
         "mergesmith.learn.cli", "mergesmith.learn.dam_cli", "mergesmith.search.cli", "mergesmith.moe.cli",
         "mergesmith.lora.cli", "mergesmith.route.cli", "mergesmith.multistage.cli", "mergesmith.vocab.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mergesmith",
                                     description="Merge language models without training.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of any error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for area in AREAS:
        importlib.import_module(area).register(sub)
    return parser


def _interrupt_on_sigterm():
    """Make SIGTERM raise KeyboardInterrupt; returns the previous handler (None off the main thread)."""
    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, handler)


def _os_error_text(err: OSError) -> str:
    where = f"{err.filename}: " if getattr(err, "filename", None) else ""
    return f"{where}{err.strerror or err}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # --debug is accepted anywhere on the line, not only before the subcommand.
    debug = "--debug" in argv
    args = build_parser().parse_args([a for a in argv if a != "--debug"])
    previous = _interrupt_on_sigterm()
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if debug:
            raise
        if isinstance(err, InputError):
            print(f"error: {err}", file=sys.stderr)
            return 2
        if isinstance(err, ResourceError):
            print(f"error: {err}", file=sys.stderr)
        elif isinstance(err, OSError):
            print(f"error: {_os_error_text(err)} (rerun with --debug for the traceback)", file=sys.stderr)
        elif isinstance(err, MemoryError):
            print("error: out of memory; close other programs, lower --prefetch or merge on a machine "
                  "with more memory", file=sys.stderr)
        else:
            print(f"error: {type(err).__name__}: {err}\nThis is probably a bug in mergesmith; rerun with "
                  "--debug for the traceback and report it.", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
