"""NearSwap (alchemonaut, https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001;
mergekit's ``nearswap``).

Takes the secondary model's value where it lies close to the base and keeps the base
where the two are far apart, with a smooth ramp in between. Per entry, with base a,
secondary b and threshold t:

    w      = clamp(t / max(|a - b|, 1e-6), 0, 1)
    merged = (1 - w) * a + w * b

So entries with |a - b| <= t become b exactly, and an entry at distance d > t moves
the fraction t / d of the way from a to b. t = 0 returns the base.
"""

from __future__ import annotations

import torch

from mergesmith.methods.base import BasePolicy, MethodSpec, Param, TensorGroup, every_tensor, register

# mergekit's floor on |a - b|: where the two agree the weight saturates at 1.
_DISTANCE_FLOOR = 1e-6


def nearness_weight(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """w = clamp(t / max(|a - b|, floor), 0, 1): 1 where a and b are within t."""
    return (t / (a - b).abs().clamp(min=_DISTANCE_FLOOR)).clamp(0.0, 1.0)


def nearswap(group: TensorGroup) -> torch.Tensor:
    base = group.base
    others, _ = group.others()
    if len(others) != 1:
        raise ValueError(f"{group.name}: nearswap takes exactly one model besides the base")
    secondary = others[0]
    # lerp is exact at both ends: w = 0 gives the base, w = 1 the secondary value.
    return torch.lerp(base, secondary, nearness_weight(base, secondary, group.params["t"]))


register(MethodSpec(
    name="nearswap",
    fn=nearswap,
    params=(Param("t", float, low=0.0,
                  doc="distance below which the secondary model's value is taken"),),
    base=BasePolicy.REQUIRED,
    min_models=1,
    max_models=1,
    reference="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
    summary="take the other model's value where it is within t of the base",
    row_separable=every_tensor,
))
