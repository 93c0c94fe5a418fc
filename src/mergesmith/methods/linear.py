"""Linear merge ("model soups", Wortsman et al. 2022, https://arxiv.org/abs/2203.05482).

    merged = sum_i w_i * theta_i            (normalize: false)
    merged = sum_i w_i * theta_i / sum_i w_i (normalize: true, the default)

The base model, when given, is an input like any other and needs a weight.
"""

from __future__ import annotations

import torch

from mergesmith.methods.base import MethodSpec, Param, TensorGroup, every_tensor, register, weight_param


def weighted_sum(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    out = torch.zeros_like(tensors[0])
    for tensor, weight in zip(tensors, weights):
        out.add_(tensor, alpha=weight)
    return out


def linear(group: TensorGroup) -> torch.Tensor:
    weights = [p["weight"] for p in group.model_params]
    merged = weighted_sum(group.tensors, weights)
    if group.params["normalize"]:
        total = sum(weights)
        if abs(total) < 1e-8:
            raise ValueError(f"{group.name}: linear weights sum to zero under normalize")
        merged.div_(total)
    return merged


def _check(params: dict, model_params: list[dict]) -> list[str]:
    if params["normalize"] and abs(sum(p["weight"] for p in model_params)) < 1e-8:
        return ["the weights sum to zero, which normalize: true cannot divide by; "
                "change a weight or set normalize: false"]
    return []


register(MethodSpec(
    name="linear",
    fn=linear,
    params=(weight_param(on_base=True),
            Param("normalize", bool, True, doc="divide by the sum of the weights")),
    reference="https://arxiv.org/abs/2203.05482",
    summary="weighted average of the models",
    check_params=_check,
    row_separable=every_tensor,
))
