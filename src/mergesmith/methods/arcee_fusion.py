"""Arcee Fusion (Arcee AI, mergekit's ``arcee_fusion``; https://arcee.ai, no paper).

Keeps the base model except where the fine-tuned model's change is an outlier in
importance. With base b and fine-tuned f (softmax and sums over the last axis):

    p, q       = softmax(f) + 1e-8,  softmax(b) + 1e-8
    KL         = sum p log(p / q)                        (one value per row)
    importance = |f - b| * KL
    threshold  = Q2 + 1.5 (Q3 - Q1)                     (Tukey's upper fence)
    merged     = f where importance >= threshold, else b

Q1, Q2, Q3 are the lower nearest-rank quantiles of the importance: the entries at
sorted positions floor(q (n - 1)) for q = 1/4, 1/2, 3/4. They are computed exactly
for every tensor; mergekit estimates them from 1e6 entries drawn with replacement
(from torch's global generator) when a tensor has more than 1e6 entries, so on such
tensors its threshold, and the few entries near it, vary from run to run.
"""

from __future__ import annotations

import torch

from mergesmith.methods.base import BasePolicy, MethodSpec, TensorGroup, register
from mergesmith.methods.sparsify import kth_smallest

_SOFTMAX_FLOOR = 1e-8  # keeps log(p / q) finite where a softmax underflows
_FENCE = 1.5


def row_kl_divergence(finetuned: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """KL(softmax(f) || softmax(b)) along the last axis, kept as a size-1 axis."""
    p = torch.softmax(finetuned, dim=-1) + _SOFTMAX_FLOOR
    q = torch.softmax(base, dim=-1) + _SOFTMAX_FLOOR
    return (p * torch.log(p / q)).sum(dim=-1, keepdim=True)


def importance_scores(finetuned: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    return (finetuned - base).abs() * row_kl_divergence(finetuned, base)


def quartiles(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q1, Q2, Q3: the sorted entries at positions floor(i (n - 1) / 4), i = 1, 2, 3.

    Selected exactly (``kth_smallest``) rather than by a full sort; integer positions stay exact
    for any n.
    """
    flat = values.reshape(-1)
    last = flat.numel() - 1
    q1, q2, q3 = (kth_smallest(flat, last * i // 4 + 1) for i in (1, 2, 3))
    return q1, q2, q3


def upper_fence(importance: torch.Tensor) -> torch.Tensor:
    q1, median, q3 = quartiles(importance)
    return median + _FENCE * (q3 - q1)


def arcee_fusion(group: TensorGroup) -> torch.Tensor:
    base = group.base
    others, _ = group.others()
    if len(others) != 1:
        raise ValueError(f"{group.name}: arcee_fusion takes exactly one model besides the base")
    finetuned = others[0]
    importance = importance_scores(finetuned, base)
    return torch.where(importance >= upper_fence(importance), finetuned, base)


register(MethodSpec(
    name="arcee_fusion",
    fn=arcee_fusion,
    base=BasePolicy.REQUIRED,
    min_models=1,
    max_models=1,
    reference="https://arcee.ai",
    summary="take the fine-tuned values whose importance is an upper outlier",
))
