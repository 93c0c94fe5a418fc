"""Peak memory of a merge whose inputs are PyTorch ``.bin`` files, against the same in safetensors.

Builds three random-weight Llama-shaped float32 checkpoints (about 0.7 GB each at
the default size), saved both as ``pytorch_model.bin`` and as ``model.safetensors``,
then runs the same linear merge over each format in its own process under
``/usr/bin/time -v`` and prints wall time and peak RSS, and whether the two outputs
are identical. Both formats are memory-mapped; after each tensor the engine drops
its pages, so neither should hold all inputs in memory at once.

    .venv/bin/python benchmarks/bench_bin_inputs.py [--layers 12] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent))
from bench_merge_1b import llama_tensors  # noqa: E402

BIN = Path(sys.executable).parent


def build(workdir: Path, layers: int) -> None:
    shapes = llama_tensors(1024, 2816, layers, 16000, 16, 16)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 1024,
              "intermediate_size": 2816, "num_hidden_layers": layers, "num_attention_heads": 16,
              "num_key_value_heads": 16, "vocab_size": 16000, "rms_norm_eps": 1e-5,
              "tie_word_embeddings": False}
    for i in range(3):
        gen = torch.Generator().manual_seed(i)
        state = {name: torch.randn(shape, generator=gen) * 0.02 for name, shape in shapes}
        for fmt in ("bin", "safetensors"):
            folder = workdir / f"model{i}-{fmt}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "config.json").write_text(json.dumps(config))
            if fmt == "bin":
                torch.save(state, folder / "pytorch_model.bin")
            else:
                save_file(state, folder / "model.safetensors")
        size = sum(t.numel() for t in state.values()) * 4 / 2 ** 30
    print(f"three checkpoints of {size:.2f} GiB each, in both formats, under {workdir}")


def run(workdir: Path, fmt: str) -> tuple[float, float, Path]:
    recipe = workdir / f"{fmt}.yml"
    recipe.write_text("merge_method: linear\ndtype: float32\nmodels:\n" + "".join(
        f"  - model: {workdir / f'model{i}-{fmt}'}\n    parameters: {{weight: 1.0}}\n" for i in range(3)))
    out = workdir / f"out-{fmt}"
    shutil.rmtree(out, ignore_errors=True)
    proc = subprocess.run(["/usr/bin/time", "-v", str(BIN / "mergesmith"), "merge", str(recipe), str(out),
                           "--no-progress"], capture_output=True, text=True, check=True)
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", proc.stderr)
    seconds = int(wall.group(1) or 0) * 3600 + int(wall.group(2)) * 60 + float(wall.group(3))
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1)) / 2 ** 20
    return seconds, rss, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-bin-"))
    try:
        build(workdir, args.layers)
        results = {fmt: run(workdir, fmt) for fmt in ("safetensors", "bin")}
        print(f"{'inputs':12s} {'wall':>8s} {'peak RSS':>10s}")
        for fmt, (seconds, rss, _) in results.items():
            print(f"{fmt:12s} {seconds:7.1f}s {rss:8.2f} GiB")
        a, b = (load_output(results[fmt][2]) for fmt in ("bin", "safetensors"))
        print("outputs identical:", a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a))
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir)


def load_output(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


if __name__ == "__main__":
    main()
