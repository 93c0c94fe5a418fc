"""Where a subspace merge spends its time on one weight matrix, and what the polar-factor
algebra of ``mergesmith.methods.subspace`` saves (issue #8).

For each matrix shape, with three task vectors (random, float32), times in one process:

- ``eigh``: one float64 ``torch.linalg.eigh`` of the r x r Gram matrix (r = min(m, n)), the
  step exactness rests on (docs/methods/subspace.md);
- ``tsv_m``, ``iso_c`` and ``iso_cts`` on that matrix, two ways: as the methods' equations
  read, every polar factor formed explicitly (U = A V / s, then U V^T; Iso-CTS projecting
  each task vector and decomposing it at full size: how the library computed them before),
  and as the library computes them now (``polar_product``, the inverse square root of the
  Gram, Iso-CTS's block structure). Both are exact in float64; the script prints their
  largest relative difference.

Each figure is the median of ``--repeats`` runs after one warm-up. Absolute times mean
something only on the machine they were measured on; the ratios are the point.

    python benchmarks/bench_subspace_kernels.py [--shapes 512x512,512x1376,1376x512] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mergesmith.methods import TensorGroup, get_method
from mergesmith.methods.subspace import iso_cts_split, reconstruct, singular_triplets, sum_of

TASKS = 3
METHODS = ("tsv_m", "iso_c", "iso_cts")


def explicit_polar(a: torch.Tensor) -> torch.Tensor:
    u, _, vh = singular_triplets(a)
    return u @ vh


def tsv_m_explicit(deltas):
    k = min(deltas[0].shape) // len(deltas)
    trip = [singular_triplets(d, k) for d in deltas]
    u, s, vh = (torch.cat([t[0] for t in trip], 1), torch.cat([t[1] for t in trip]),
                torch.cat([t[2] for t in trip], 0))
    return reconstruct(explicit_polar(u), s, explicit_polar(vh))


def iso_c_explicit(deltas):
    u, s, vh = singular_triplets(sum_of(deltas))
    return (u @ vh).mul_(s.mean())


def iso_cts_explicit(deltas, f=0.8):
    common, per_task = iso_cts_split(min(deltas[0].shape), len(deltas), f)
    u_c, s_c, vh_c = singular_triplets(sum_of(deltas), common)
    us, ss, vhs = [u_c], [s_c], [vh_c]
    for d in deltas:
        tau = d.double()
        u, s, vh = singular_triplets(tau - u_c @ (u_c.T @ tau), per_task)
        us.append(u), ss.append(s), vhs.append(vh)
    return explicit_polar(torch.cat(us, 1)).mul_(torch.cat(ss).mean()) @ explicit_polar(torch.cat(vhs, 0))


EXPLICIT = {"tsv_m": tsv_m_explicit, "iso_c": iso_c_explicit, "iso_cts": iso_cts_explicit}


def library(name, deltas):
    """The method's merged task vector as the engine computes it (base zero, lambda 1)."""
    spec = get_method(name)
    params = {p.name: p.default for p in spec.params if not p.per_model}
    params["lambda"] = 1.0
    zero = torch.zeros_like(deltas[0])
    return spec.fn(TensorGroup(name="w", tensors=[zero, *deltas], params=params,
                               model_params=[{}] + [{"weight": 1.0}] * len(deltas), base_index=0))


def timed(fn, *args, repeats: int) -> tuple[float, torch.Tensor]:
    out = fn(*args)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="512x512,512x1376,1376x512")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {TASKS} task vectors, "
          f"median of {args.repeats}")
    print(f"{'shape':>11} {'eigh r x r':>10}" + "".join(
        f" | {name + ' before':>14} {'now':>8} {'ratio':>6} {'diff':>8}" for name in METHODS))
    for spec in args.shapes.split(","):
        m, n = (int(x) for x in spec.split("x"))
        g = torch.Generator().manual_seed(m * 7 + n)
        common = torch.randn(m, n, generator=g)
        deltas = [0.01 * (common + torch.randn(m, n, generator=g)) for _ in range(TASKS)]
        r = min(m, n)
        gram = torch.randn(r, r, dtype=torch.float64, generator=g)
        gram = gram @ gram.T
        t_eigh, _ = timed(torch.linalg.eigh, gram, repeats=args.repeats)
        line = f"{spec:>11} {t_eigh * 1e3:8.1f}ms"
        for name in METHODS:
            t_before, before = timed(EXPLICIT[name], deltas, repeats=args.repeats)
            t_now, now = timed(library, name, deltas, repeats=args.repeats)
            line += (f" | {t_before * 1e3:12.1f}ms {t_now * 1e3:6.1f}ms {t_before / t_now:5.2f}x "
                     f"{rel(now, before.float()):8.1e}")
        print(line, flush=True)


if __name__ == "__main__":
    main()
