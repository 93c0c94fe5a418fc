"""PCB-Merging (Du et al., "Parameter Competition Balancing for Model Merging", NeurIPS 2024,
https://arxiv.org/abs/2410.02396).

Every entry of every task vector gets a score that balances its importance within its
own task (intra) against its agreement with the other tasks (inter); each task keeps its
best-scored ``density`` fraction, weighted by the normalized score. With T task vectors
tau_t of d entries and Norm(x) = (x - min x) / (max x - min x) over one task's entries:

    a_t   = clamp(|tau_t|, q_0.0001, q_0.9999)       (magnitude outliers clipped per task)
    intra = exp(T * Norm(a_t)^2)                    (the paper's Softmax(T Norm(tau_t^2)); its
                                                     denominator cancels in the final Norm)
    inter = tanh(tau_t * sum_s tau_s)
    beta_t = intra * inter
    m_t   = Norm(max(beta_t, q_(1 - density)(beta_t)))   (drop below the quantile, rescale)
    tau   = sum_t m_t sgn(tau_t) a_t / max(sum_t m_t, 1e-12)
    theta = theta_0 + lambda * tau

The quantiles are the authors' order statistics: q_p(x) is sorted(x)[int(d p)], and the
upper clip is sorted(x)[int(d (1 - 0.0001) - 1)]. The specification is the authors'
``pcb-merging.py`` (github.com/duguodong7/pcb-merging, ``PCB_merge``).

Where we differ: the authors score the whole flattened model at once; a streaming merge
scores each tensor on its own (quantiles, Norm and the clip are per tensor). A constant
row, where Norm would be 0/0, normalizes to 0. ``weight`` scales tau_t before scoring
(the authors' per-task coefficients multiply the clipped vectors after it). PCB is not a
matrix method: every tensor, 1-D or embedding, gets the same treatment, as in the
authors' code. See docs/methods/interference.md.
"""

from __future__ import annotations

import torch

from mergesmith.methods.base import BasePolicy, MethodSpec, Param, TensorGroup, register, weight_param
from mergesmith.methods.drm import weighted_task_vectors
from mergesmith.methods.sparsify import kth_smallest
from mergesmith.methods.task_arithmetic import apply_task_vector

# The fraction of magnitudes clipped at each end (authors' ``clamp(..., 0.0001, 0.0001)``).
CLIP_RATIO = 0.0001
# Lower bound of the denominator sum_t m_t (authors' code).
SCALE_FLOOR = 1e-12


def order_statistic(row: torch.Tensor, index: int) -> torch.Tensor:
    """sorted(row)[index] (0-based), without sorting."""
    return kth_smallest(row, index + 1)


def min_max_normalize(rows: torch.Tensor) -> torch.Tensor:
    """(x - min) / (max - min) along the last axis, in place; a constant row becomes 0."""
    low = rows.amin(dim=-1, keepdim=True)
    span = rows.amax(dim=-1, keepdim=True).sub_(low)
    return rows.sub_(low).div_(torch.where(span > 0, span, torch.ones_like(span)))


def clip_magnitudes(deltas: torch.Tensor) -> torch.Tensor:
    """a_t = clamp(|tau_t|, sorted[int(d r)], sorted[int(d (1 - r) - 1)]) per row, r = 1e-4."""
    d = deltas.shape[1]
    out = deltas.abs()
    for row in out:
        low = order_statistic(row, int(d * CLIP_RATIO))
        high = order_statistic(row, int(d * (1 - CLIP_RATIO) - 1))
        row.clamp_(low, high)
    return out


def balancing_scores(deltas: torch.Tensor, clipped: torch.Tensor) -> torch.Tensor:
    """beta_t = exp(T Norm(a_t)^2) * tanh(tau_t * sum_s tau_s), shape (T, d)."""
    t = deltas.shape[0]
    intra = min_max_normalize(clipped.clone()).square_().mul_(t).exp_()
    inter = torch.mul(deltas, deltas.sum(dim=0)).tanh_()  # in place: one (T, d) temporary, not two
    return intra.mul_(inter)


def keep_top_scores(scores: torch.Tensor, density: float) -> torch.Tensor:
    """m_t = Norm(max(beta_t, sorted(beta_t)[int(d (1 - density))])) per row, in place."""
    d = scores.shape[1]
    for row in scores:
        row.clamp_(min=order_statistic(row, int(d * (1 - density))))
    return min_max_normalize(scores)


def pcb_merge_flat(deltas: torch.Tensor, density: float) -> torch.Tensor:
    """The PCB merged task vector of (T, d) task vectors, which it overwrites (with their
    signs); see the module docstring."""
    clipped = clip_magnitudes(deltas)
    scale = keep_top_scores(balancing_scores(deltas, clipped), density)
    weighted = clipped.mul_(deltas.sign_()).mul_(scale)
    return weighted.sum(dim=0).div_(scale.sum(dim=0).clamp_(min=SCALE_FLOOR))


def pcb(group: TensorGroup) -> torch.Tensor:
    """theta_0 + lambda * PCB(w_1 tau_1, ..., w_T tau_T), scored per tensor."""
    base = group.base
    deltas = weighted_task_vectors(group).reshape(-1, base.numel())
    merged = pcb_merge_flat(deltas, group.params["density"]).reshape(base.shape)
    return apply_task_vector(base, merged, group.params["lambda"])


register(MethodSpec(
    name="pcb", fn=pcb,
    params=(
        weight_param(default=1.0),
        Param("density", float, 0.1, low=0.0, high=1.0, low_open=True,
              doc="fraction of each task's entries kept, by balancing score"),
        Param("lambda", float, 1.0, doc="scale of the merged task vector"),
    ),
    base=BasePolicy.REQUIRED, min_models=1,
    # The vocabulary tensors (32000 x 2048, three experts, float32 math; the 1.1B family of
    # benchmarks/bench_subspace.py cut to its vocabulary tensors and one small layer): peak 4.9 GiB
    # against 2.65 GiB for ties, about 2.2 tensors per input more; 2 more than the engine's
    # allowance predicts 5.1 GiB with the runtime.
    workspace_per_input=2.0,
    reference="https://arxiv.org/abs/2410.02396",
    summary="score entries by intra- and inter-task balance, keep the top density, weighted mean",
))
