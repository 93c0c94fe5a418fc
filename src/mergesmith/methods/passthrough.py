"""Passthrough: copy one input tensor unchanged, optionally scaled (mergekit's
``passthrough``). Used for layer stacking ("frankenmerges") through slices, where
each output tensor comes from exactly one input:

    merged = scale * theta

The base model, if given, is just another input.
"""

from __future__ import annotations

import torch

from mergesmith.methods.base import BasePolicy, MethodSpec, Param, TensorGroup, every_tensor, register


def passthrough(group: TensorGroup) -> torch.Tensor:
    if len(group.tensors) != 1:
        raise ValueError(f"{group.name}: passthrough takes exactly one input tensor, "
                         f"got {len(group.tensors)}")
    tensor = group.tensors[0]
    scale = group.model_params[0]["scale"]
    # A copy even at scale 1, so the engine may write into the output freely.
    return tensor.clone() if scale == 1.0 else tensor * scale


register(MethodSpec(
    name="passthrough",
    fn=passthrough,
    params=(Param("scale", float, 1.0, per_model=True, on_base=True,
                  doc="factor the tensor is multiplied by"),),
    base=BasePolicy.IGNORED,
    min_models=1,
    max_models=1,
    reference="https://github.com/arcee-ai/mergekit",
    summary="copy a single input tensor, optionally scaled (layer stacking)",
    passthrough=True,
    row_separable=every_tensor,
))
