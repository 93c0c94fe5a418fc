"""Time the task-arithmetic family against mergekit 0.1.5 on the same tensors.

Inputs: a base and three models, float32, of the largest Llama-1.1B MLP shape
(2048 x 5632 = 11.5M entries). Each method runs on the same inputs in both libraries;
the best of ``--repeat`` runs is reported, with the ratio mergekit / ours.

    nice -n 10 .venv/bin/python benchmarks/bench_methods_task_arithmetic.py
    nice -n 10 .venv/bin/python benchmarks/bench_methods_task_arithmetic.py --methods ties --repeat 3
"""

from __future__ import annotations

import argparse
import time

import torch

from mergesmith.methods import TensorGroup, get_method

# method -> per-model parameters used for both libraries
CASES: dict[str, dict] = {
    "task_arithmetic": {},
    "ties": {"density": 0.5},
    "dare_linear": {"density": 0.5},
    "dare_ties": {"density": 0.5},
    "breadcrumbs": {"density": 0.8, "gamma": 0.05},
    "breadcrumbs_ties": {"density": 0.8, "gamma": 0.05},
    "della": {"density": 0.5, "epsilon": 0.1},
    "della_linear": {"density": 0.5, "epsilon": 0.1},
    "consensus_ta": {},
    "consensus_ties": {"density": 0.2},
}


def make_inputs(rows: int, cols: int, models: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(rows, cols, generator=g)
    # Fine-tunes are small deltas from the base, as in real checkpoints.
    return [base] + [base + 0.01 * torch.randn(rows, cols, generator=g) for _ in range(models)]


def ours_group(name: str, tensors: list[torch.Tensor], per_model: dict, seed: int,
               disposable: bool) -> TensorGroup:
    spec = get_method(name)
    params = {p.name: p.default for p in spec.params if not p.per_model}
    defaults = {p.name: p.default for p in spec.params if p.per_model and not p.required}
    model_params = [{}] + [dict(defaults, weight=1.0, **per_model) for _ in tensors[1:]]
    if disposable:  # the engine hands over freshly loaded tensors; copy outside the timing
        tensors = [t.clone() for t in tensors]
    return TensorGroup(name, tensors, params, model_params, base_index=0,
                       generator=torch.Generator().manual_seed(seed), disposable=disposable)


def run_mergekit(name: str, tensors: list[torch.Tensor], per_model: dict) -> torch.Tensor:
    from mergekit.merge_methods import get
    from mergekit.merge_methods.base import TensorGroup as MergekitGroup

    method = get(name)
    group = MergekitGroup.from_tensors(tensors, base_index=0)
    parameters = {"weight": [1.0] * (len(tensors) - 1), **per_model}
    return method([group], parameters=parameters)[0]


def best_time(fn, repeat: int, setup=lambda: None) -> tuple[float, float]:
    """Best wall-clock and best CPU (all threads) seconds over ``repeat`` runs of
    ``fn(setup())``. On a shared machine the CPU time is the steadier measure."""
    wall = cpu = float("inf")
    for _ in range(repeat):
        arg = setup()
        start, start_cpu = time.perf_counter(), time.process_time()
        fn(arg)
        wall = min(wall, time.perf_counter() - start)
        cpu = min(cpu, time.process_time() - start_cpu)
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="*", default=list(CASES))
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--cols", type=int, default=5632)
    parser.add_argument("--models", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--keep-inputs", action="store_true",
                        help="time our methods with disposable=False (inputs left untouched); "
                             "by default they get disposable inputs, as the engine gives them")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from mergekit.merge_methods import registered_methods

    in_mergekit = {m.spec.name for m in registered_methods()}

    tensors = make_inputs(args.rows, args.cols, args.models)
    print(f"{args.models} models + base, {args.rows}x{args.cols} float32, "
          f"{torch.get_num_threads()} threads, best of {args.repeat}, "
          f"{'inputs kept' if args.keep_inputs else 'disposable inputs'}")
    print(f"{'':18s} {'wall seconds':^29s}   {'CPU seconds':^29s}")
    print(f"{'method':18s} {'ours':>8s} {'mergekit':>10s} {'ratio':>9s}   "
          f"{'ours':>8s} {'mergekit':>10s} {'ratio':>9s}")
    for name in args.methods:
        per_model = CASES[name]
        ours = best_time(lambda group: get_method(name).fn(group), args.repeat,
                         lambda: ours_group(name, tensors, per_model, 0, not args.keep_inputs))
        if name not in in_mergekit:  # consensus_* has no mergekit counterpart
            print(f"{name:18s} {ours[0]:8.3f} {'-':>10s} {'-':>9s}   {ours[1]:8.3f}")
            continue
        theirs = best_time(lambda _: run_mergekit(name, tensors, per_model), args.repeat)
        print(f"{name:18s} {ours[0]:8.3f} {theirs[0]:10.3f} {theirs[0] / ours[0]:8.1f}x   "
              f"{ours[1]:8.3f} {theirs[1]:10.3f} {theirs[1] / ours[1]:8.1f}x")


if __name__ == "__main__":
    main()
