"""mergesmith vs mergekit on a 1.1B-parameter Llama-shaped TIES merge: wall time, peak RSS, I/O floor.

Builds random-weight checkpoints (a base and three variants: base + noise) of the
TinyLlama-1.1B shape in bfloat16, then runs the same recipe (TIES, density 0.5,
three models) through ``mergesmith merge`` and ``mergekit-yaml``, each in its own
process under ``/usr/bin/time -v``, and prints wall time, peak resident memory, the
ratios, the I/O floor (read every input once, write one output once, on this
machine) and how far apart the two outputs are.

    .venv/bin/python benchmarks/bench_merge_1b.py                 # full size
    .venv/bin/python benchmarks/bench_merge_1b.py --layers 2      # a quick check of the script

The checkpoints are cached in --workdir; a second run reuses them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from mergesmith.checkpoint.reader import Checkpoint
from mergesmith.checkpoint.writer import CheckpointWriter, OutputTensor
from mergesmith.methods.sparsify import kth_smallest, magnitude_keep_count

BIN = Path(sys.executable).parent


def llama_tensors(hidden: int, inter: int, layers: int, vocab: int, heads: int, kv_heads: int) -> list[tuple[str, tuple]]:
    head_dim = hidden // heads
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [(p + "self_attn.q_proj.weight", (hidden, hidden)),
                   (p + "self_attn.k_proj.weight", (kv_heads * head_dim, hidden)),
                   (p + "self_attn.v_proj.weight", (kv_heads * head_dim, hidden)),
                   (p + "self_attn.o_proj.weight", (hidden, hidden)),
                   (p + "mlp.gate_proj.weight", (inter, hidden)),
                   (p + "mlp.up_proj.weight", (inter, hidden)),
                   (p + "mlp.down_proj.weight", (hidden, inter)),
                   (p + "input_layernorm.weight", (hidden,)),
                   (p + "post_attention_layernorm.weight", (hidden,))]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return shapes


def build_checkpoints(workdir: Path, args) -> tuple[Path, list[Path]]:
    """A base and three variants; ``args.dtype`` (default bfloat16) is the stored dtype."""
    dtype = getattr(args, "dtype", torch.bfloat16)
    shapes = llama_tensors(args.hidden, args.intermediate, args.layers, args.vocab, args.heads, args.kv_heads)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": args.hidden,
              "intermediate_size": args.intermediate, "num_hidden_layers": args.layers,
              "num_attention_heads": args.heads, "num_key_value_heads": args.kv_heads, "vocab_size": args.vocab,
              "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
              "torch_dtype": str(dtype).removeprefix("torch."), "hidden_act": "silu", "rope_theta": 10000.0}
    names = ["base", "ft1", "ft2", "ft3"]
    paths = [workdir / n for n in names]
    if all((p / "model.safetensors.index.json").exists() for p in paths):
        return paths[0], paths[1:]
    print(f"building 4 checkpoints of {sum(torch.Size(s).numel() for _, s in shapes) / 1e9:.2f}B parameters "
          f"in {workdir} ...", flush=True)
    for seed, path in enumerate(paths):
        specs = [OutputTensor(n, dtype, s) for n, s in shapes]
        with CheckpointWriter(path, specs, 2 * 10 ** 9, overwrite=True) as w:
            for name, shape in shapes:
                # Same base for everyone (seeded by name); variants add their own noise.
                g = torch.Generator().manual_seed(hash(name) % 2 ** 31)
                t = torch.randn(shape, generator=g) * 0.02
                if seed:
                    t += torch.randn(shape, generator=torch.Generator().manual_seed(seed * 7919 + len(name))) * 0.002
                w.write(name, t.to(dtype))
            w.write_file("config.json", json.dumps(config, indent=2))
            w.commit()
    return paths[0], paths[1:]


def timed(cmd: list[str], log: Path, env: dict | None = None) -> tuple[float, float]:
    """Run under /usr/bin/time -v (``env``: variables added to this process's); return (wall
    seconds, peak RSS in GiB)."""
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(["/usr/bin/time", "-v", *cmd], stdout=f, stderr=subprocess.STDOUT,
                              env={**os.environ, **env} if env else None)
    wall = time.perf_counter() - start
    text = log.read_text()
    if proc.returncode != 0:
        sys.exit(f"{cmd[0]} failed (exit {proc.returncode}); see {log}:\n{text[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1))
    return wall, rss_kb / 2 ** 20


def io_floor(inputs: list[Path], out_bytes: int, scratch: Path) -> float:
    """Seconds to read every input file once and write (and fsync) one output-sized file."""
    start = time.perf_counter()
    buf = bytearray(64 << 20)
    for model in inputs:
        for f in sorted(model.glob("*.safetensors")):
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass
    with open(scratch, "wb") as fh:
        left = out_bytes
        while left > 0:
            n = fh.write(memoryview(buf)[: min(len(buf), left)])
            left -= n
        fh.flush()
        os.fsync(fh.fileno())
    scratch.unlink()
    return time.perf_counter() - start


def compare(a: Path, b: Path, base: Path, fts: list[Path], density: float) -> tuple[float, float, int]:
    """Where the two outputs differ, and whether only at TIES threshold ties.

    Returns (max |a-b| relative to max |b|, fraction of elements that differ, number of
    differing elements at positions where no model's |delta| equals its trim threshold).
    The two tools keep the same number of entries per task vector but break ties between
    equal magnitudes differently (mergekit: an unstable argsort), so differences are
    expected exactly at tied positions and nowhere else.
    """
    ca, cb, c0 = Checkpoint.open(a), Checkpoint.open(b), Checkpoint.open(base)
    cfs = [Checkpoint.open(p) for p in fts]
    worst, differ, total, untied = 0.0, 0, 0, 0
    for name in cb.infos:
        x, y = ca.read(name).float(), cb.read(name).float()
        worst = max(worst, ((x - y).abs().max() / y.abs().max().clamp_min(1e-12)).item())
        mask = x != y
        differ += int(mask.sum())
        total += y.numel()
        if mask.any():
            b0 = c0.read(name).float()
            tied = torch.zeros_like(mask)
            for cf in cfs:
                mag = (cf.read(name).float() - b0).abs().reshape(-1)
                k = magnitude_keep_count(density, mag.numel())
                threshold = kth_smallest(mag, mag.numel() - k + 1)
                tied |= (mag == threshold).reshape(mask.shape)
            untied += int((mask & ~tied).sum())
    return worst, differ / max(total, 1), untied


def add_shape_arguments(ap: argparse.ArgumentParser) -> None:
    """--workdir and the model shape (TinyLlama-1.1B by default), shared with bench_moe.py."""
    ap.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "mergesmith-bench-1b")
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_arguments(ap)
    ap.add_argument("--dtype", default="float32", help="the recipe's dtype (math dtype for both tools); 'none' omits it")
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    work = args.workdir / f"L{args.layers}-H{args.hidden}-I{args.intermediate}-V{args.vocab}"
    work.mkdir(parents=True, exist_ok=True)
    # The checkpoints are stored in bfloat16; --dtype is the recipe's math dtype, not theirs.
    shape = argparse.Namespace(**{k: getattr(args, k) for k in ("hidden", "intermediate", "layers", "vocab",
                                                                "heads", "kv_heads")})
    base, fts = build_checkpoints(work, shape)
    recipe = {"merge_method": "ties", "base_model": str(base),
              "models": [{"model": str(p), "parameters": {"weight": 1.0, "density": 0.5}} for p in fts],
              "parameters": {"normalize": True}, "out_dtype": "bfloat16"}
    if args.dtype != "none":
        recipe["dtype"] = args.dtype
    recipe_path = work / "ties.yml"
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))

    ours_out, theirs_out = work / "out-mergesmith", work / "out-mergekit"
    for d in (ours_out, theirs_out):
        shutil.rmtree(d, ignore_errors=True)
    n_threads = os.cpu_count() or 1
    ours = timed([str(BIN / "mergesmith"), "merge", str(recipe_path), str(ours_out), "--no-progress",
                  "--device", args.device], work / "mergesmith.log")
    print(f"mergesmith:  {ours[0]:7.1f} s   peak RSS {ours[1]:5.2f} GiB", flush=True)
    theirs = None
    if not args.skip_mergekit:
        theirs = timed([str(BIN / "mergekit-yaml"), str(recipe_path), str(theirs_out), "--no-copy-tokenizer",
                        "-j", str(n_threads)] + (["--cuda"] if args.device != "cpu" else []),
                       work / "mergekit.log")
        print(f"mergekit:    {theirs[0]:7.1f} s   peak RSS {theirs[1]:5.2f} GiB", flush=True)
    out_bytes = sum(f.stat().st_size for f in ours_out.glob("*.safetensors"))
    floor = io_floor([base, *fts], out_bytes, work / "io-floor.bin")
    print(f"I/O floor:   {floor:7.1f} s   (read {len(fts) + 1} inputs, write one output, this machine)")
    params = sum(torch.Size(s).numel() for _, s in llama_tensors(args.hidden, args.intermediate, args.layers,
                                                                  args.vocab, args.heads, args.kv_heads))
    print(f"\nTIES, density 0.5, 3 models + base, {params / 1e9:.2f}B parameters, bf16 in/out, "
          f"dtype {args.dtype}, {n_threads} cores")
    if theirs:
        print(f"speed-up: {theirs[0] / ours[0]:.1f}x   memory: {theirs[1] / ours[1]:.1f}x less", flush=True)
        worst, frac, untied = compare(ours_out, theirs_out, base, fts, 0.5)
        print(f"outputs: {frac:.2e} of elements differ (max relative difference {worst:.2e}); "
              f"{untied} of them where no task vector has a tie at its trim threshold "
              "(0 means every difference is tie-breaking between equal magnitudes)")


if __name__ == "__main__":
    main()
