"""Time model_stock, sce, nearswap, arcee_fusion, ram, ramplus_tl and passthrough
against mergekit 0.1.5's kernels on the same float32 inputs.

Inputs are 2048 x 5632 (a Llama-1.1B MLP matrix, 11.5M entries): a base plus three
fine-tunes (one for nearswap and arcee_fusion, which take exactly one). The ram
methods get sparse, RL-like fine-tunes. Each line gives the best of ``--repeat``
wall-clock times in seconds and mergekit's time divided by ours (> 1: we are faster).

    nice -n 10 .venv/bin/python benchmarks/bench_methods_other.py
    nice -n 10 .venv/bin/python benchmarks/bench_methods_other.py --methods sce --repeat 3
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch

from mergesmith.methods import TensorGroup, get_method

# label -> (method, global parameters, number of fine-tunes, sparse fine-tunes)
CASES: dict[str, tuple[str, dict, int, bool]] = {
    "model_stock": ("model_stock", {"filter_wise": False}, 3, False),
    "model_stock/filter": ("model_stock", {"filter_wise": True}, 3, False),
    "sce": ("sce", {"select_topk": 1.0}, 3, False),
    "sce/topk=0.1": ("sce", {"select_topk": 0.1}, 3, False),
    "nearswap": ("nearswap", {"t": 0.01}, 1, False),
    "arcee_fusion": ("arcee_fusion", {}, 1, False),
    "ram": ("ram", {}, 3, True),
    "ramplus_tl": ("ramplus_tl", {}, 3, True),
    "passthrough/x0.5": ("passthrough", {}, 0, False),
}


def make_inputs(rows: int, cols: int, finetunes: int, sparse: bool,
                seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(rows, cols, generator=g)
    out = [base]
    for _ in range(finetunes):
        delta = 0.01 * torch.randn(rows, cols, generator=g)
        if sparse:
            delta *= torch.rand(rows, cols, generator=g) < 0.3
        out.append(base + delta)
    return out


def ours(method: str, tensors: list[torch.Tensor], params: dict) -> Callable[[], torch.Tensor]:
    spec = get_method(method)
    if method == "passthrough":
        group = TensorGroup(method, tensors, {}, [{"scale": 0.5}])
    else:
        defaults = {p.name: p.default for p in spec.params if not p.required}
        group = TensorGroup(method, tensors, {**defaults, **params},
                            [{} for _ in tensors], base_index=0)
    return lambda: spec.fn(group)


def mergekit(method: str, tensors: list[torch.Tensor], params: dict) -> Callable[[], torch.Tensor]:
    from mergekit.merge_methods import get
    from mergekit.merge_methods.base import TensorGroup as MergekitGroup

    kernel = get(method)
    if method == "passthrough":
        group, params = MergekitGroup.from_tensors(tensors), {"scale": [0.5]}
    else:
        group = MergekitGroup.from_tensors(tensors, base_index=0)
    return lambda: kernel([group], parameters=params)[0]


def best_time(fn: Callable[[], torch.Tensor], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--cols", type=int, default=5632)
    args = parser.parse_args()

    print(f"{args.rows}x{args.cols} float32, {torch.get_num_threads()} threads, "
          f"best of {args.repeat}")
    print(f"{'case':20s} {'ours s':>8s} {'mergekit s':>11s} {'mergekit/ours':>14s}")
    for label in args.methods:
        method, params, finetunes, sparse = CASES[label]
        tensors = make_inputs(args.rows, args.cols, finetunes, sparse)
        mine = best_time(ours(method, tensors, params), args.repeat)
        theirs = best_time(mergekit(method, tensors, params), args.repeat)
        print(f"{label:20s} {mine:8.3f} {theirs:11.3f} {theirs / mine:13.2f}x")
        del tensors


if __name__ == "__main__":
    main()
