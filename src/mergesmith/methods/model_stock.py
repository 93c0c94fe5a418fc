"""Model Stock (Jang et al. 2024, "Model Stock: All we need is just a few fine-tuned
models", https://arxiv.org/abs/2403.19522).

With base weights w_0 and k >= 2 fine-tuned weights w_1..w_k, the offsets
d_i = w_i - w_0 are assumed to share a common angle theta. Its cosine is estimated
as the mean pairwise cosine of the offsets, and the merge interpolates between the
base and the average of the fine-tuned weights:

    cos(theta) = mean_{i<j} <d_i, d_j> / (|d_i| |d_j|)
    t          = k cos(theta) / (1 + (k - 1) cos(theta))
    w_H        = t * (1/k) sum_i w_i + (1 - t) * w_0

``filter_wise: false`` (the default) estimates one angle for the whole tensor;
``filter_wise: true`` one per row (the last axis is a filter; a 1-D tensor is a
single filter). Where 1 + (k-1) cos(theta) vanishes the ratio has no finite value and
the base is kept, as in mergekit.
"""

from __future__ import annotations

import torch

from mergesmith.methods.base import BasePolicy, MethodSpec, Param, TensorGroup, register
from mergesmith.methods.task_arithmetic import stacked_task_vectors

# Floors shared with mergekit's model_stock so degenerate tensors land the same way.
_NORM_FLOOR = 1e-6
_SINGULAR = 1e-6


def mean_pairwise_cosine(offsets: torch.Tensor) -> torch.Tensor:
    """Mean cosine over all unordered pairs of ``offsets[i]`` along the last axis.

    ``offsets`` has shape (k, ..., d); the result has shape (...). Zero offsets count
    as cosine 0 (the norm product is floored), so an unchanged model pulls t down.
    """
    k = offsets.shape[0]
    gram = torch.einsum("i...d,j...d->...ij", offsets, offsets)
    norms = torch.diagonal(gram, dim1=-2, dim2=-1).clamp(min=0).sqrt()
    cosines = gram / (norms.unsqueeze(-1) * norms.unsqueeze(-2)).clamp(min=_NORM_FLOOR)
    upper = torch.triu_indices(k, k, offset=1, device=offsets.device)
    return cosines[..., upper[0], upper[1]].clamp(-1.0, 1.0).mean(dim=-1)


def interpolation_ratio(cos_theta: torch.Tensor, k: int) -> torch.Tensor:
    """t = k cos / (1 + (k-1) cos), and 0 (keep the base) where the denominator vanishes."""
    denominator = 1 + (k - 1) * cos_theta
    singular = denominator.abs() < _SINGULAR
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    return torch.where(singular, torch.zeros_like(cos_theta), k * cos_theta / safe)


def model_stock(group: TensorGroup) -> torch.Tensor:
    base = group.base
    others, _ = group.others()
    k = len(others)
    if k < 2:
        raise ValueError(f"{group.name}: model_stock needs at least two models besides the base")
    offsets = stacked_task_vectors(base, others)
    if group.params["filter_wise"]:
        rows = offsets.reshape(k, 1, -1) if base.dim() <= 1 else offsets
    else:
        rows = offsets.reshape(k, -1)
    t = interpolation_ratio(mean_pairwise_cosine(rows), k).unsqueeze(-1)
    # t * average + (1 - t) * w_0  ==  w_0 + t * mean_i d_i
    return base + (t * rows.mean(dim=0)).reshape(base.shape)


register(MethodSpec(
    name="model_stock",
    fn=model_stock,
    params=(Param("filter_wise", bool, False,
                  doc="estimate the angle per row (filter) instead of per tensor"),),
    base=BasePolicy.REQUIRED,
    min_models=2,
    reference="https://arxiv.org/abs/2403.19522",
    summary="interpolate base to the average by the models' mutual angle",
))
