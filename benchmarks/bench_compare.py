"""The main speed claims, rerun: two mergesmith versions and the peers, side by side, paired.

Each benchmark is a merge run as a whole process under ``/usr/bin/time -v`` (wall time, peak
RSS), by every side in turn within one repetition (the order rotates between repetitions, so
that neither side always runs on a warmer page cache). A ratio is taken within each
repetition, and the median with its range over the repetitions is printed: a ratio is only
claimed from runs made together.

Sides:
- ``--a`` and ``--b``: mergesmith versions, each a git commit (checked out into a worktree
  under ``--workdir`` and run with this Python and ``PYTHONPATH`` pointing at its ``src``) or
  ``installed`` (the ``mergesmith`` on this Python's path). Leave ``--b`` out to compare one
  version with the peers only.
- the peers: mergekit for TIES (``mergekit-yaml``), FusionBench 0.2.33 for the subspace
  methods (its programs' flow: ``bench_subspace.FUSIONBENCH_RUN``).

Benchmarks (``--benches``, comma-separated):
- ``ties-small``: TIES, density 0.5, three experts plus base, TinyLlama-1.1B widths with 2
  layers (0.22B parameters), bf16 in and out, float32 math (bench_merge_1b.py's recipe);
- ``ties-1b``: the same at 22 layers (1.1B parameters: the README's figure);
- ``tsv_m``, ``iso_c``, ``iso_cts``: the 58M float32 family of bench_subspace.py, three experts.

    .venv/bin/python benchmarks/bench_compare.py --a HEAD --b 9e48507 --benches ties-small,tsv_m
    .venv/bin/python benchmarks/bench_compare.py --a installed --benches ties-1b --repeats 2
    .venv/bin/python benchmarks/bench_compare.py --threads 1,2 --no-peer --benches tsv_m,ties-small

``--threads 1,2`` runs each mergesmith version once per count (``mergesmith merge --threads N``)
beside the default (no ``--threads``: torch's count, the number of cores).

Measure on an idle machine: every other process takes cores from the side that runs beside it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from bench_merge_1b import BIN, build_checkpoints, timed  # noqa: E402
from bench_subspace import FUSIONBENCH_RUN  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TIES_SHAPE = dict(hidden=2048, intermediate=5632, vocab=32000, heads=32, kv_heads=4)
SUBSPACE_SHAPE = dict(hidden=512, intermediate=1376, layers=8, vocab=32000, heads=8, kv_heads=8,
                      dtype=torch.float32)
BENCHES = ("ties-small", "ties-1b", "tsv_m", "iso_c", "iso_cts")


@dataclass
class Side:
    """One thing that merges: a mergesmith version or a peer."""
    name: str
    command: list[str]  # the merge command before the recipe and output arguments
    env: dict = field(default_factory=dict)


def mergesmith_side(name: str, ref: str, work: Path) -> Side:
    """``installed``, or a git commit checked out (detached) into a worktree of this repository."""
    if ref == "installed":
        return Side(name, [str(BIN / "mergesmith"), "merge"])
    sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", f"{ref}^{{commit}}"],
                         capture_output=True, text=True, check=True).stdout.strip()
    tree = work / f"mergesmith-{sha[:10]}"
    if not (tree / "src" / "mergesmith").is_dir():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "--force", str(tree), sha],
                       check=True, capture_output=True)
    env = {"PYTHONPATH": str(tree / "src")}
    return Side(f"{name} ({ref}, {sha[:8]})", [sys.executable, "-m", "mergesmith", "merge"], env)


def family(bench: str, work: Path) -> tuple[Path, list[Path]]:
    if bench.startswith("ties"):
        layers = 22 if bench == "ties-1b" else 2
        folder = work / f"family-ties-{layers}layers"
        return build_checkpoints(folder, argparse.Namespace(layers=layers, **TIES_SHAPE))
    return build_checkpoints(work / "family-58m", argparse.Namespace(**SUBSPACE_SHAPE))


def recipe_for(bench: str, base: Path, experts: list[Path]) -> dict:
    if bench.startswith("ties"):
        return {"merge_method": "ties", "base_model": str(base), "dtype": "float32", "out_dtype": "bfloat16",
                "parameters": {"normalize": True},
                "models": [{"model": str(e), "parameters": {"weight": 1.0, "density": 0.5}} for e in experts]}
    return {"merge_method": bench, "base_model": str(base), "dtype": "float32",
            "models": [{"model": str(e), "parameters": {"weight": 1.0}} for e in experts]}


def peer_command(bench: str, recipe_path: Path, out: Path, base: Path, experts: list[Path]) -> list[str]:
    if bench.startswith("ties"):
        return [str(BIN / "mergekit-yaml"), str(recipe_path), str(out), "--no-copy-tokenizer",
                "-j", str(os.cpu_count() or 1)]
    return [sys.executable, "-c", FUSIONBENCH_RUN, bench, str(out / "model.safetensors"), str(base),
            *map(str, experts)]


def run_side(side: Side | None, bench: str, recipe_path: Path, out: Path, base: Path, experts: list[Path],
             log: Path) -> tuple[float, float]:
    shutil.rmtree(out, ignore_errors=True)
    if side is None:  # the peer
        out.mkdir(parents=True)
        cmd, env = peer_command(bench, recipe_path, out, base, experts), {}
    else:
        cmd, env = [*side.command, str(recipe_path), str(out), "--no-progress"], side.env
    try:
        return timed(cmd, log, env)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):5.2f}x [{min(values):.2f}-{max(values):.2f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", default="installed", help="a git commit, or 'installed' (default)")
    ap.add_argument("--b", default=None, help="a second version to compare (a git commit or 'installed')")
    ap.add_argument("--benches", default="ties-small,tsv_m,iso_c,iso_cts",
                    help=f"comma-separated, from {', '.join(BENCHES)} (default: all but ties-1b)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-peer", action="store_true", help="only the mergesmith versions")
    ap.add_argument("--threads", default="", help="comma-separated counts: each version also runs with --threads N")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "mergesmith-bench-compare")
    args = ap.parse_args()
    benches = [b for b in args.benches.split(",") if b]
    unknown = [b for b in benches if b not in BENCHES]
    if unknown:
        sys.exit(f"--benches: unknown {', '.join(unknown)}; choose from {', '.join(BENCHES)}")
    args.workdir.mkdir(parents=True, exist_ok=True)
    sides: list[Side | None] = [mergesmith_side("A", args.a, args.workdir)]
    if args.b:
        sides.append(mergesmith_side("B", args.b, args.workdir))
    sides += [Side(f"{side.name} --threads {n}", [*side.command, "--threads", n], side.env)
              for side in list(sides) for n in args.threads.split(",") if n]
    if not args.no_peer:
        sides.append(None)
    print(f"{os.cpu_count()} cores; sides: " + "; ".join(s.name if s else "peer" for s in sides), flush=True)

    for bench in benches:
        base, experts = family(bench, args.workdir)
        recipe_path = args.workdir / f"{bench}.yml"
        recipe_path.write_text(yaml.safe_dump(recipe_for(bench, base, experts), sort_keys=False))
        peer = "mergekit 0.1.5" if bench.startswith("ties") else "FusionBench 0.2.33"
        names = [s.name if s else peer for s in sides]
        walls: dict[str, list[float]] = {n: [] for n in names}
        peaks: dict[str, list[float]] = {n: [] for n in names}
        print(f"\n{bench}: {len(experts)} experts + base", flush=True)
        for r in range(args.repeats):
            order = sides[r % len(sides):] + sides[:r % len(sides)]
            for side in order:
                name = side.name if side else peer
                wall, peak = run_side(side, bench, recipe_path, args.workdir / "out", base, experts,
                                      args.workdir / f"{bench}-{r}-{names.index(name)}.log")
                walls[name].append(wall)
                peaks[name].append(peak)
                print(f"  repeat {r + 1}: {name:34s} {wall:7.1f} s  {peak:5.2f} GiB", flush=True)
        for name in names:
            print(f"  {name:34s} median {statistics.median(walls[name]):7.1f} s  "
                  f"{statistics.median(peaks[name]):5.2f} GiB")
        ours = [n for n in names if n != peer]
        for n in ours[1:]:
            speed = [o / a for a, o in zip(walls[ours[0]], walls[n])]
            print(f"  {ours[0]} against {n}: speed {spread(speed)}")
        if peer in names:
            for n in ours:
                speed = [p / o for p, o in zip(walls[peer], walls[n])]
                memory = [p / o for p, o in zip(peaks[peer], peaks[n])]
                print(f"  {n} against {peer}: speed {spread(speed)}, memory {spread(memory)} less")


if __name__ == "__main__":
    main()
