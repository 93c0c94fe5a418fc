"""What the NaN/Inf check on every input and output tensor costs (issue #12, principle 3).

The engine checks each tensor with ``mergesmith.engine.tensor.nonfinite_counts``: one float32
sum, counted only when the sum is not finite. This script times, on the tensor shapes of
one TinyLlama-1.1B layer plus its embedding (bf16 on disk, float32 in memory):

- the conversion the reader already does for every input (bf16 -> float32 copy),
- our check on the converted tensor,
- the obvious alternative, ``torch.isfinite(x).all()``,

and prints the check's time as a share of the conversion. With ``--merge LAYERS`` it
then times whole merges (TIES, density 0.5, three bf16 models of the TinyLlama-1.1B shape
cut to LAYERS layers, built by ``bench_merge_1b.py``'s builder) with the check and with it
switched off, alternating, and prints the best time of each and their ratio.

    python benchmarks/bench_nonfinite_check.py [--repeats 5] [--threads N] [--merge 4]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

import mergesmith
import mergesmith.engine.tensor as engine_tensor
from mergesmith.engine.tensor import nonfinite_counts

SHAPES = {  # TinyLlama-1.1B: hidden 2048, intermediate 5632, 4 KV heads of 64, vocab 32000
    "embed_tokens": (32000, 2048),
    "q_proj": (2048, 2048),
    "k_proj": (256, 2048),
    "v_proj": (256, 2048),
    "o_proj": (2048, 2048),
    "gate_proj": (5632, 2048),
    "up_proj": (5632, 2048),
    "down_proj": (2048, 5632),
    "input_layernorm": (2048,),
}


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--merge", type=int, default=0, metavar="LAYERS",
                        help="also time whole merges of models with this many layers (0: skip)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "mergesmith-bench-nonfinite")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, best of {args.repeats}")
    print(f"{'tensor':16s} {'shape':>14s} {'bf16->f32':>10s} {'our check':>10s} {'isfinite.all':>12s} {'share':>6s}")
    total_convert = total_check = total_naive = 0.0
    for name, shape in SHAPES.items():
        stored = torch.randn(shape, dtype=torch.float32).to(torch.bfloat16)
        x = stored.to(torch.float32, copy=True)
        assert nonfinite_counts(x) is None
        convert = best_of(lambda: stored.to(torch.float32, copy=True), args.repeats)
        check = best_of(lambda: nonfinite_counts(x), args.repeats)
        naive = best_of(lambda: bool(torch.isfinite(x).all()), args.repeats)
        total_convert, total_check, total_naive = total_convert + convert, total_check + check, total_naive + naive
        print(f"{name:16s} {str(list(shape)):>14s} {convert * 1e3:8.2f}ms {check * 1e3:8.2f}ms "
              f"{naive * 1e3:10.2f}ms {check / convert:6.1%}")
    print(f"{'all':16s} {'':>14s} {total_convert * 1e3:8.2f}ms {total_check * 1e3:8.2f}ms "
          f"{total_naive * 1e3:10.2f}ms {total_check / total_convert:6.1%}")
    print(f"our check takes {total_check / total_naive:.2f}x the time of isfinite().all()")
    if args.merge:
        time_merges(args)


def time_merges(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_merge_1b import build_checkpoints

    shape = argparse.Namespace(hidden=2048, intermediate=5632, layers=args.merge, vocab=32000, heads=32, kv_heads=4)
    base, variants = build_checkpoints(args.workdir / f"layers{args.merge}", shape)
    recipe = {"merge_method": "ties", "base_model": str(base), "dtype": "float32", "out_dtype": "bfloat16",
              "models": [{"model": str(v), "parameters": {"weight": 1.0, "density": 0.5}} for v in variants]}
    out = args.workdir / "out"
    real = engine_tensor.nonfinite_counts
    times: dict[str, list[float]] = {"with check": [], "without": []}
    for _ in range(args.repeats):
        for label in times:
            engine_tensor.nonfinite_counts = real if label == "with check" else (lambda x: None)
            start = time.perf_counter()
            mergesmith.merge(recipe, out, overwrite=True, progress=False)
            times[label].append(time.perf_counter() - start)
    engine_tensor.nonfinite_counts = real
    shutil.rmtree(out, ignore_errors=True)
    best = {k: min(v) for k, v in times.items()}
    print(f"\nTIES merge, 3 models, {args.merge} layers: best of {args.repeats}: "
          + ", ".join(f"{k} {v:.2f}s" for k, v in best.items())
          + f"; ratio {best['with check'] / best['without']:.3f}")


if __name__ == "__main__":
    main()
