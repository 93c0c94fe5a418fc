"""SCE: Select, Calculate, Erase (Wan et al. 2024, "FuseChat: Knowledge Fusion of Chat
Models", https://arxiv.org/abs/2408.07990, section 3.3).

With task vectors delta_i = theta_i - theta_base for the k non-base models:

    Select:    keep the fraction ``select_topk`` of entries with the largest variance
               across the k task vectors (entries where all agree carry no signal):
               delta_i <- delta_i * M,  M = top-k(Var_i(delta_i))
    Calculate: one coefficient per model and tensor from its squared magnitude:
               eta_i = sum(delta_i ** 2) / sum_j sum(delta_j ** 2)
    Erase:     per entry, drop the task vectors whose sign disagrees with the sign of
               sum_i delta_i (TIES' sign election; a zero sum counts as positive):
               m_i = [sign(delta_i) == sign(sum_j delta_j)]
    Merge:     theta = theta_base + sum_i eta_i m_i delta_i / sum_i eta_i m_i

The final division by the surviving coefficients follows mergekit; entries where no
model survives keep the base value.
"""

from __future__ import annotations

import torch

from mergesmith.methods.base import BasePolicy, MethodSpec, Param, TensorGroup, register
from mergesmith.methods.sparsify import smallest_mask
from mergesmith.methods.task_arithmetic import elect_sign, stacked_task_vectors

# mergekit's floors: below these the coefficients fall back to uniform and the
# per-entry denominator is clamped.
_ZERO_ENERGY = 1e-6
_DENOMINATOR_FLOOR = 1e-6


def population_variance(deltas: torch.Tensor) -> torch.Tensor:
    """Var_i(delta_i) = mean_i (delta_i - mean_j delta_j)^2, over the leading axis.

    Written out because ``torch.var(dim=0)`` over a short leading axis is ~4x slower
    on CPU; the values agree to float32 rounding.
    """
    centered = deltas - deltas.mean(dim=0)
    return centered.square_().mean(dim=0)


def top_variance_mask(deltas: torch.Tensor, fraction: float) -> torch.Tensor:
    """Boolean mask of the ``fraction`` of entries with the largest variance across models.

    The count is taken over entries with nonzero variance, so entries where every
    model agrees are never selected. Ties at the cut keep the later entries
    (``smallest_mask`` drops the earlier ones first).
    """
    if fraction >= 1:
        return torch.ones(deltas.shape[1:], dtype=torch.bool, device=deltas.device)
    variance = population_variance(deltas)
    keep = int(torch.count_nonzero(variance).item() * fraction)
    return ~smallest_mask(variance, variance.numel() - keep)


def magnitude_coefficients(deltas: torch.Tensor) -> torch.Tensor:
    """eta_i = mean(delta_i^2) / sum_j mean(delta_j^2); uniform when all are ~zero."""
    energy = deltas.reshape(deltas.shape[0], -1).square().mean(dim=1)
    total = energy.sum()
    if total.abs().item() < _ZERO_ENERGY:
        return torch.full_like(energy, 1.0 / energy.shape[0])
    return energy / total


def majority_sign_mask(deltas: torch.Tensor) -> torch.Tensor:
    """m_i = sign(delta_i) == sign(sum_j delta_j), a zero sum electing + (TIES, 'sum').

    Zero entries match neither sign, so they never count as survivors.
    """
    positive = elect_sign(deltas)
    return torch.where(positive, deltas > 0, deltas < 0)


def sce(group: TensorGroup) -> torch.Tensor:
    base = group.base
    others, _ = group.others()
    if not others:
        return base.clone()
    deltas = stacked_task_vectors(base, others)
    if group.params["select_topk"] < 1:
        deltas *= top_variance_mask(deltas, group.params["select_topk"])
    eta = magnitude_coefficients(deltas)
    keep = majority_sign_mask(deltas)
    deltas *= keep  # erased entries now contribute nothing to the sums below
    numerator = torch.tensordot(eta, deltas, dims=1)
    denominator = torch.tensordot(eta, keep.to(deltas.dtype), dims=1)
    return base + numerator / denominator.clamp(min=_DENOMINATOR_FLOOR)


register(MethodSpec(
    name="sce",
    fn=sce,
    params=(
        Param("select_topk", float, 1.0, low=0.0, high=1.0, low_open=True,
              doc="fraction of entries (by variance across models) kept"),
        Param("int8_mask", bool, False,
              doc="accepted for mergekit recipes; masks are boolean here, so it has no effect"),
    ),
    base=BasePolicy.REQUIRED,
    min_models=1,
    reference="https://arxiv.org/abs/2408.07990",
    summary="select by variance, weight by squared magnitude, erase minority signs",
))
