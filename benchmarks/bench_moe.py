"""mergesmith moe vs mergekit-moe: four experts of the TinyLlama-1.1B shape, time and peak RSS.

Builds random-weight Llama checkpoints (a base and three fine-tunes, bfloat16; the four are the
experts, the base also the base model) with a word-level tokenizer, then runs one mergekit-moe
config through ``mergesmith moe`` and ``mergekit-moe``, each as a whole process under
``/usr/bin/time -v``, and prints wall time, peak resident memory, the ratios, and how far apart
the two outputs are (routers; every expert tensor must be equal).

    .venv/bin/python benchmarks/bench_moe.py                          # full size (about 9 GB of inputs)
    .venv/bin/python benchmarks/bench_moe.py --layers 2 --hidden 256 --intermediate 688 --vocab 2000

The checkpoints are cached in --workdir (shared with bench_merge_1b.py); a second run reuses them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import torch
import yaml

from bench_merge_1b import BIN, add_shape_arguments, build_checkpoints, timed
from mergesmith.checkpoint.reader import Checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny_models import write_tokenizer  # noqa: E402


def moe_config(base: Path, experts: list[Path], gate_mode: str) -> dict:
    return {"base_model": str(base), "gate_mode": gate_mode, "dtype": "bfloat16", "experts_per_token": 2,
            "experts": [{"source_model": str(p), "positive_prompts": [f"t{10 + 3 * i} t{11 + 3 * i} t{12 + 3 * i}"]}
                        for i, p in enumerate(experts)]}


def compare(ours: Path, theirs: Path, layers: int) -> tuple[float, int]:
    """(max |router difference|, number of expert tensors that differ) between the two outputs."""
    a, b = Checkpoint.open(ours), Checkpoint.open(theirs)
    worst = 0.0
    for i in range(layers):
        x = a.read(f"model.layers.{i}.block_sparse_moe.gate.weight").float()
        y = b.read(f"model.layers.{i}.mlp.gate.weight").float()
        worst = max(worst, (x - y).abs().max().item())
    fused = {n: b.read(n) for n in b.infos if "experts." in n}
    differ = 0
    for name in a.infos:
        if ".experts." not in name:
            continue
        layer, expert, w = int(name.split(".")[2]), int(name.split(".")[5]), name.split(".")[6]
        if w == "w2":
            theirs_t = fused[f"model.layers.{layer}.mlp.experts.down_proj"][expert]
        else:
            gate_up = fused[f"model.layers.{layer}.mlp.experts.gate_up_proj"][expert]
            half = gate_up.shape[0] // 2
            theirs_t = gate_up[:half] if w == "w1" else gate_up[half:]
        differ += not torch.equal(a.read(name), theirs_t)
    return worst, differ


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_arguments(ap)
    ap.add_argument("--gate-mode", default="hidden", help="mergekit's default, hidden")
    ap.add_argument("--prompt-dtype", default="bfloat16",
                    help="mergesmith's --prompt-dtype (default bfloat16, its default and mergekit's precision)")
    ap.add_argument("--skip-mergekit", action="store_true")
    args = ap.parse_args()
    args.dtype = torch.bfloat16

    work = args.workdir / f"L{args.layers}-H{args.hidden}-I{args.intermediate}-V{args.vocab}"
    work.mkdir(parents=True, exist_ok=True)
    base, fts = build_checkpoints(work, args)
    if not (base / "tokenizer.json").exists():
        write_tokenizer(base, args.vocab)
    config_path = work / f"moe-{args.gate_mode}.yml"
    config_path.write_text(yaml.safe_dump(moe_config(base, [base, *fts], args.gate_mode), sort_keys=False))

    ours_out, theirs_out = work / "moe-mergesmith", work / "moe-mergekit"
    for d in (ours_out, theirs_out):
        shutil.rmtree(d, ignore_errors=True)
    ours = timed([str(BIN / "mergesmith"), "moe", str(config_path), str(ours_out), "--no-progress",
                  "--prompt-dtype", args.prompt_dtype],
                 work / "moe-mergesmith.log")
    print(f"mergesmith moe:  {ours[0]:7.1f} s   peak RSS {ours[1]:5.2f} GiB", flush=True)
    params = sum(i.numel for i in Checkpoint.open(ours_out).infos.values())
    print(f"\n4 experts, top-2, gate_mode {args.gate_mode} (mergesmith's prompt pass in {args.prompt_dtype}), "
          f"{params / 1e9:.2f}B output parameters (bf16), "
          f"{os.cpu_count()} cores")
    if args.skip_mergekit:
        return
    theirs = timed([str(BIN / "mergekit-moe"), str(config_path), str(theirs_out), "--device", "cpu"],
                   work / "moe-mergekit.log")
    print(f"mergekit-moe:    {theirs[0]:7.1f} s   peak RSS {theirs[1]:5.2f} GiB", flush=True)
    print(f"speed-up: {theirs[0] / ours[0]:.1f}x   memory: {theirs[1] / ours[1]:.1f}x less")
    worst, differ = compare(ours_out, theirs_out, args.layers)
    print(f"outputs: routers differ by at most {worst:.2e} per entry (mergekit's prompt pass is bf16); "
          f"{differ} expert tensors differ (0 expected)")


if __name__ == "__main__":
    main()
