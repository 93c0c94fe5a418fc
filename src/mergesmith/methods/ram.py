"""RAM and RAM+ (Yuan et al. 2026, "Behavior Knowledge Merge in Reinforced Agentic
Models", https://arxiv.org/abs/2601.13572; mergekit's ``ram`` and ``ramplus_tl``).

RL fine-tuning changes few parameters, and different agents change different ones.
With task vectors delta_i = theta_i - theta_base, an entry counts as changed by model
i when |delta_i| > epsilon; c = number of models that changed it:

    m_i = [|delta_i| > epsilon],   c = sum_i m_i
    shared region: c >= 2  ->  average of the changes, sum_i m_i delta_i / c
    unique region: c == 1  ->  the one change, kept whole (RAM) or rescaled (RAM+)
    unchanged:     c == 0  ->  the base

    RAM:  theta = theta_base + sum_i m_i delta_i / max(c, 1)

RAM+ scales model i's unique changes up by how much of its update is shared, to make
up for what averaging removed from it:

    rho_i    = #(m_i and c >= 2) / #(m_i and c == 1)
    lambda_i = 1 + r * clamp(rho_i, 0, alpha)
    RAM+: theta = theta_base + sum_i m_i delta_i * (lambda_i if c == 1 else 1 / c)

``ramplus_tl`` ("tensor-local", mergekit's variant) counts rho_i within each tensor;
the authors' released script counts it over the whole model, which a tensor-at-a-time
merge cannot see, with lambda_i = 1 + (R - 1) min(1, rho_i), i.e. r = R - 1, alpha = 1.
mergekit divides by max(#unique, epsilon) rather than #unique; the two agree for
epsilon <= 1, which covers any realistic change threshold.
"""

from __future__ import annotations

import torch

from mergesmith.methods.base import BasePolicy, MethodSpec, Param, TensorGroup, every_tensor, register
from mergesmith.methods.task_arithmetic import stacked_task_vectors


def change_masks(deltas: torch.Tensor, epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    """m_i = |delta_i| > epsilon, and c = how many models changed each entry."""
    changed = deltas.abs() > epsilon
    # Accumulating row by row is several times faster on CPU than a bool sum(dim=0).
    counts = torch.zeros(changed.shape[1:], dtype=torch.int32, device=changed.device)
    for row in changed:
        counts += row
    return changed, counts


def overlap_rescale(changed: torch.Tensor, counts: torch.Tensor, r: float,
                    alpha: float) -> torch.Tensor:
    """lambda_i = 1 + r clamp(rho_i, 0, alpha), rho_i = shared_i / unique_i (per tensor)."""
    only_one = counts == 1
    unique = torch.stack([torch.count_nonzero(row & only_one) for row in changed])
    shared = torch.stack([torch.count_nonzero(row) for row in changed]) - unique
    # A model with no unique entries has nothing to rescale; any lambda will do.
    rho = shared / unique.clamp(min=1)
    return 1 + r * rho.clamp(0.0, alpha)


def _deltas(group: TensorGroup) -> torch.Tensor | None:
    others, _ = group.others()
    return stacked_task_vectors(group.base, others) if others else None


def ram(group: TensorGroup) -> torch.Tensor:
    deltas = _deltas(group)
    if deltas is None:
        return group.base.clone()
    changed, counts = change_masks(deltas, group.params["epsilon"])
    deltas *= changed  # deltas is our own copy
    return group.base + deltas.sum(dim=0) / counts.clamp(min=1)


def ramplus_tl(group: TensorGroup) -> torch.Tensor:
    deltas = _deltas(group)
    if deltas is None:
        return group.base.clone()
    changed, counts = change_masks(deltas, group.params["epsilon"])
    rescale = overlap_rescale(changed, counts, group.params["r"], group.params["alpha"])
    deltas *= changed  # deltas is our own copy
    # Where c == 1 exactly one term is nonzero, so the rescaled sum is that change
    # times its model's lambda; where c >= 2 the plain sum over c is the average.
    rescaled = torch.tensordot(rescale.to(deltas.dtype), deltas, dims=1)
    averaged = deltas.sum(dim=0) / counts.clamp(min=1)
    return group.base + torch.where(counts == 1, rescaled, averaged)


_EPSILON = Param("epsilon", float, 1e-5, low=0.0,
                 doc="an entry counts as changed when |theta_i - theta_base| exceeds this")

register(MethodSpec(
    name="ram",
    fn=ram,
    params=(_EPSILON,),
    base=BasePolicy.REQUIRED,
    min_models=1,
    reference="https://arxiv.org/abs/2601.13572",
    summary="average shared changes, keep each model's unique changes whole",
    # Entry-wise (ramplus_tl is not: its rho_i counts over the whole tensor).
    row_separable=every_tensor,
))

register(MethodSpec(
    name="ramplus_tl",
    fn=ramplus_tl,
    params=(
        Param("r", float, 0.1, low=0.0, doc="strength of the rescaling of unique changes"),
        Param("alpha", float, 0.2, low=0.0, doc="cap on the shared/unique ratio rho"),
        _EPSILON,
    ),
    base=BasePolicy.REQUIRED,
    min_models=1,
    reference="https://arxiv.org/abs/2601.13572",
    summary="RAM with unique changes scaled up by each model's overlap (per tensor)",
))
