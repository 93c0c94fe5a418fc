"""Subspace methods (issue #8): mergesmith against FusionBench, and every method at 1.1B.

Part ``fusionbench``: a Llama-shaped family of about 58M parameters (hidden 512, 8 layers,
intermediate 1376, vocab 32000; a base and three variants, float32). FusionBench's TSV-M,
Iso-C and Iso-CTS run as its programs do: every state dict loaded whole into memory, task
vectors formed, its merge function called (``TSVM_utils.compute_and_sum_svd_mem_reduction``,
``iso_utils.iso_c`` / ``iso_cts``) with the embeddings and ``lm_head`` excluded, the result
added to the base and saved. mergesmith runs ``mergesmith merge`` on the same recipe. Each
run is its own process under ``/usr/bin/time -v``; the script prints wall time, peak RSS,
the ratios and the largest relative difference between the two outputs (per tensor,
``|ours - theirs| / |theirs|``, max over tensors). ``--ours-only`` runs our side alone (and a
plain ``task_arithmetic`` merge of the family, the floor any method's streaming sets), for
measuring our memory without waiting minutes for FusionBench.

Part ``1b``: every method of the issue on the TinyLlama-1.1B family of
``bench_merge_1b.py`` (bf16), against our TIES on the same inputs: wall time and peak RSS (each
output is deleted once measured: 2.2 GiB at 22 layers).
``--layers`` cuts the family to fewer layers (a quick check of the script, or a
per-layer cost to scale from); ``--methods`` picks methods.

    python benchmarks/bench_subspace.py --part fusionbench [--ours-only]
    python benchmarks/bench_subspace.py --part 1b [--layers 22] [--methods tsv_m,iso_c]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import textwrap
from pathlib import Path

import torch
import yaml
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).parent))
from bench_merge_1b import BIN, build_checkpoints, timed  # noqa: E402

EXCLUDE = ("model.embed_tokens.weight", "lm_head.weight")
FUSIONBENCH_METHODS = ("tsv_m", "iso_c", "iso_cts")
ALL_METHODS = ("ties", "tsv_m", "iso_c", "iso_cts", "star", "cart", "drm", "pcb", "wudi")

# The FusionBench side: its programs' flow (load everything, task vectors, merge, add, save).
FUSIONBENCH_RUN = textwrap.dedent("""
    import glob, sys, torch
    from safetensors.torch import load_file, save_file
    from fusion_bench.method.task_singular_vector.utils.TSVM_utils import compute_and_sum_svd_mem_reduction
    from fusion_bench.method.isotropic_merging.iso_utils import iso_c, iso_cts
    method, out, base, *experts = sys.argv[1:]
    exclude = {exclude!r}
    torch.set_grad_enabled(False)
    def load(folder):
        state = {{}}
        for shard in sorted(glob.glob(folder + "/*.safetensors")):
            state.update(load_file(shard))
        return state
    base_sd = load(base)
    tvs = []
    for e in experts:
        sd = load(e)
        tvs.append({{k: sd[k] - base_sd[k] for k in base_sd}})
        del sd
    if method == "tsv_m":
        merged = compute_and_sum_svd_mem_reduction(tvs, exclude_keys=list(exclude), accelerator="cpu")
    elif method == "iso_c":
        merged = iso_c(tvs, accelerator="cpu", exclude_keys=list(exclude))
    else:
        merged = iso_cts(tvs, common_space_fraction=0.8, accelerator="cpu", exclude_keys=list(exclude))
    save_file({{k: (base_sd[k] + merged[k]).contiguous() for k in base_sd}}, out)
""").format(exclude=EXCLUDE)


def recipe(method: str, base: Path, experts: list[Path], out_dtype: str) -> dict:
    params = {"weight": 1.0}
    if method == "ties":
        params["density"] = 0.5
    return {"merge_method": method, "base_model": str(base), "dtype": "float32", "out_dtype": out_dtype,
            "models": [{"model": str(e), "parameters": dict(params)} for e in experts]}


def run_ours(method: str, base: Path, experts: list[Path], out: Path, work: Path, out_dtype: str):
    path = work / f"{method}.yml"
    path.write_text(yaml.safe_dump(recipe(method, base, experts, out_dtype)))
    return timed([str(BIN / "mergesmith"), "merge", str(path), str(out), "--overwrite", "--no-progress"],
                 work / f"ours-{method}.log")


def max_relative_difference(ours: Path, theirs_file: Path) -> float:
    index = json.loads((ours / "model.safetensors.index.json").read_text())["weight_map"]
    worst = 0.0
    with safe_open(str(theirs_file), "pt") as theirs:
        for name, shard in index.items():
            with safe_open(str(ours / shard), "pt") as f:
                a = f.get_tensor(name).double()
            b = theirs.get_tensor(name).double()
            worst = max(worst, float((a - b).norm() / b.norm().clamp_min(1e-30)))
    return worst


def part_fusionbench(work: Path, ours_only: bool = False) -> None:
    shape = argparse.Namespace(hidden=512, intermediate=1376, layers=8, vocab=32000, heads=8, kv_heads=8,
                               dtype=torch.float32)
    base, experts = build_checkpoints(work / "family-58m", shape)
    if ours_only:
        print("\nPart 1, our side only: 58M-parameter family, float32, 3 experts")
        print(f"{'method':16s} {'ours s':>8s} {'ours GiB':>9s}")
        for method in (*FUSIONBENCH_METHODS, "task_arithmetic"):
            wall, rss = run_ours(method, base, experts, work / f"ours-{method}", work, "float32")
            print(f"{method:16s} {wall:8.1f} {rss:9.2f}", flush=True)
        return
    print("\nPart 1: against FusionBench 0.2.33, 58M-parameter family, float32, 3 experts")
    print(f"{'method':8s} {'ours s':>8s} {'ours GiB':>9s} {'FB s':>8s} {'FB GiB':>8s} {'speed':>7s} "
          f"{'memory':>7s} {'max rel diff':>13s}")
    for method in FUSIONBENCH_METHODS:
        ours_out = work / f"ours-{method}"
        ours = run_ours(method, base, experts, ours_out, work, "float32")
        theirs_out = work / f"fusionbench-{method}.safetensors"
        theirs = timed([sys.executable, "-c", FUSIONBENCH_RUN, method, str(theirs_out), str(base),
                        *map(str, experts)], work / f"fusionbench-{method}.log")
        diff = max_relative_difference(ours_out, theirs_out)
        print(f"{method:8s} {ours[0]:8.1f} {ours[1]:9.2f} {theirs[0]:8.1f} {theirs[1]:8.2f} "
              f"{theirs[0] / ours[0]:6.1f}x {theirs[1] / ours[1]:6.1f}x {diff:13.2e}", flush=True)


def part_1b(work: Path, layers: int, methods: list[str]) -> None:
    shape = argparse.Namespace(hidden=2048, intermediate=5632, layers=layers, vocab=32000, heads=32, kv_heads=4)
    base, experts = build_checkpoints(work / f"family-1b-{layers}layers", shape)
    print(f"\nPart 2: TinyLlama-1.1B shape with {layers} layers, bf16, 3 experts, float32 math, bf16 output")
    print(f"{'method':8s} {'wall s':>8s} {'peak GiB':>9s} {'vs ties':>8s}")
    ties_wall = None
    for method in methods:
        out = work / f"out-1b-{method}"
        wall, rss = run_ours(method, base, experts, out, work, "bfloat16")
        shutil.rmtree(out)  # 2.2 GiB each at 22 layers; only the figures are kept
        ties_wall = wall if method == "ties" else ties_wall
        ratio = f"{wall / ties_wall:7.1f}x" if ties_wall else ""
        print(f"{method:8s} {wall:8.1f} {rss:9.2f} {ratio:>8s}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("fusionbench", "1b", "all"), default="all")
    parser.add_argument("--layers", type=int, default=22, help="layers of the 1.1B family (default 22, the full model)")
    parser.add_argument("--methods", default=",".join(ALL_METHODS),
                        help="methods for part 1b, comma-separated (ties first for the ratio)")
    parser.add_argument("--ours-only", action="store_true",
                        help="part fusionbench: run only mergesmith (and a task_arithmetic merge), not FusionBench")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "mergesmith-bench-subspace")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; work in {args.workdir}")
    if args.part in ("fusionbench", "all"):
        part_fusionbench(args.workdir, args.ours_only)
    if args.part in ("1b", "all"):
        part_1b(args.workdir, args.layers, [m.strip() for m in args.methods.split(",") if m.strip()])


if __name__ == "__main__":
    main()
