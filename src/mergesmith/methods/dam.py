"""DAM, Differentiable Adaptive Merging (Gauthier-Caron et al. 2024, https://arxiv.org/abs/2410.08371).

The merge step of DAM: every input model m scales the columns of its weight by a
learned vector c_m and the results are summed,

    W = sum_m c_m ⊙ W_m        (c_m broadcast over the rows: W[:, j] = sum_m c_m[j] W_m[:, j])

as arcee-ai/DAM's ``DAMLinearLayer.get_dam_weight`` does with the default (no)
non-linearity. The coefficients are learned by ``mergesmith dam``
(``mergesmith.learn.dam``, docs/dam.md) and reach this method as statistics from
the file the ``coefficients`` parameter names: ``group.stats[m]["coefficients"]``.
A tensor with no entry for an input (norms, embeddings, biases, tied heads) gets
DAM's initial, frozen coefficient 1/N for that input, so those tensors are the
plain average of the N inputs, as in DAM where their mergers are not trained.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from mergesmith.methods.base import MethodSpec, Param, TensorGroup, register


def column_weighted_sum(tensors: Sequence[torch.Tensor], coefficients: Sequence[Optional[torch.Tensor]]
                        ) -> torch.Tensor:
    """sum_m c_m * W_m, with c_m = 1/N where it is None; out of place, so autograd can run through it.

    The learner builds its merged model with this same function, so that the streamed
    merge reproduces the learned model bit for bit in float32.
    """
    share = 1.0 / len(tensors)
    out: Optional[torch.Tensor] = None
    for tensor, c in zip(tensors, coefficients):
        term = tensor * (share if c is None else c.to(tensor.dtype))
        out = term if out is None else out + term
    assert out is not None
    return out


def dam(group: TensorGroup) -> torch.Tensor:
    stats = group.stats or [{} for _ in group.tensors]
    return column_weighted_sum(group.tensors, [s.get("coefficients") for s in stats])


register(MethodSpec(
    name="dam",
    fn=dam,
    params=(Param("coefficients", str, stats_file=True,
                  doc="safetensors file of learned per-column coefficients (written by mergesmith dam); "
                      "entry '<tensor>:<k>' scales the columns of input k's tensor"),),
    reference="https://arxiv.org/abs/2410.08371",
    summary="per-column coefficients learned by mergesmith dam (Differentiable Adaptive Merging)",
))
