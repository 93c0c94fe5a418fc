"""Time slerp, nuslerp, multislerp and karcher: mergesmith against mergekit 0.1.5.

Both sides get the same float32 tensors (default 2048x5632, a Llama-style MLP
weight): a base W and fine-tunes W + δ_i with small δ_i, as in real merges.
mergekit is called at its per-tensor kernels (no planning or batching overhead):
``slerp.slerp``, ``nuslerp.nuslerp``, the ``multislerp`` kernel and
``karcher.karcher_merge_tensors``. Each timing is the best of ``--repeats`` runs.

Accuracy is reported against mergekit's own kernel run in float64 on the same
inputs, for both float32 implementations ("err" columns: max |Δ| / max |ref|).

    nice -n 10 .venv/bin/python benchmarks/bench_methods_spherical.py
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch

from mergesmith.methods import TensorGroup, get_method


def best_time(fn: Callable[[], torch.Tensor], repeats: int) -> tuple[float, torch.Tensor]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def error(x: torch.Tensor, reference: torch.Tensor) -> float:
    ref = reference.double()
    return float((x.double() - ref).abs().max() / ref.abs().max())


def ours(name: str, tensors: list[torch.Tensor], params: dict, model_params: list[dict],
         base_index: int | None) -> Callable[[], torch.Tensor]:
    spec = get_method(name)
    group = TensorGroup(name=name, tensors=tensors, params=params,
                        model_params=model_params, base_index=base_index)
    return lambda: spec.fn(group)


def mergekit_cases(base: torch.Tensor, models: list[torch.Tensor]):
    """name -> (our call, mergekit call taking the dtype to run in)."""
    from mergekit.merge_methods import base as mk
    from mergekit.merge_methods.karcher import karcher_merge_tensors
    from mergekit.merge_methods.multislerp import multislerp as mk_multislerp
    from mergekit.merge_methods.nuslerp import nuslerp as mk_nuslerp
    from mergekit.merge_methods.slerp import slerp as mk_slerp

    a, b, c = models
    t = 0.4
    weights = [1.0, 2.0, 1.5]

    def mk_slerp_call(dtype):
        x, y = base.to(dtype), a.to(dtype)
        return lambda: mk_slerp(torch.tensor([t], dtype=dtype), x[None], y[None])[0]

    def mk_nuslerp_call(dtype):
        x, y, z = base.to(dtype), a.to(dtype), b.to(dtype)
        frac = weights[1] / (weights[0] + weights[1])
        return lambda: x + mk_nuslerp(frac, y - x, z - x, dim=-1, flatten=True)

    def mk_multislerp_call(dtype):
        group = mk.TensorGroup.from_tensors([x.to(dtype) for x in (base, a, b, c)], base_index=0)
        per_model = mk.PerInputValues([(i, w) for i, w in zip((1, 2, 3), weights)])
        return lambda: mk_multislerp.implementation(group, weight=per_model,
                                                    normalize_weights=True, eps=1e-8)

    def mk_karcher_call(dtype):
        xs = [x.to(dtype) for x in (a, b, c)]
        return lambda: karcher_merge_tensors(xs, [1 / 3] * 3, max_iter=10, tol=1e-5)

    return {
        "slerp": (ours("slerp", [base, a], {"t": t}, [{}, {}], 0), mk_slerp_call),
        "nuslerp": (ours("nuslerp", [base, a, b],
                         {"nuslerp_flatten": True, "nuslerp_row_wise": False},
                         [{}, {"weight": weights[0]}, {"weight": weights[1]}], 0),
                    mk_nuslerp_call),
        "multislerp": (ours("multislerp", [base, a, b, c],
                            {"normalize_weights": True, "eps": 1e-8},
                            [{}] + [{"weight": w} for w in weights], 0),
                       mk_multislerp_call),
        "karcher": (ours("karcher", [a, b, c], {"max_iter": 10, "tol": 1e-5},
                         [{}, {}, {}], None),
                    mk_karcher_call),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--cols", type=int, default=5632)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="*", help="methods to run (default: all)")
    args = parser.parse_args()

    gen = torch.Generator().manual_seed(0)
    shape = (args.rows, args.cols)
    base = torch.randn(shape, generator=gen) * 0.02
    models = [base + torch.randn(shape, generator=gen) * 0.004 for _ in range(3)]

    print(f"tensors {args.rows}x{args.cols} float32, torch threads {torch.get_num_threads()}, "
          f"best of {args.repeats}")
    print(f"{'method':<11} {'ours s':>8} {'mergekit s':>10} {'ratio':>6} "
          f"{'ours err':>9} {'mk err':>9} {'ours-vs-mk':>10}")
    for name, (our_call, mk_call) in mergekit_cases(base, models).items():
        if args.only and name not in args.only:
            continue
        # Alternate so that background load hits both sides alike.
        ours_s = theirs_s = float("inf")
        for _ in range(args.repeats):
            s, our_out = best_time(our_call, 1)
            ours_s = min(ours_s, s)
            s, their_out = best_time(mk_call(torch.float32), 1)
            theirs_s = min(theirs_s, s)
        reference = mk_call(torch.float64)()
        print(f"{name:<11} {ours_s:8.3f} {theirs_s:10.3f} {theirs_s / ours_s:5.2f}x "
              f"{error(our_out, reference):9.1e} {error(their_out, reference):9.1e} "
              f"{error(our_out, their_out):10.1e}")
    print("ratio = mergekit time / our time (above 1: we are faster); "
          "err = max|Δ|/max|ref| against mergekit's kernel in float64")


if __name__ == "__main__":
    main()
