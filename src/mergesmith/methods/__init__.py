"""Merge methods: one module per family, each registering its MethodSpecs on import."""

from mergesmith.methods import (  # noqa: F401  (imported for registration)
    linear,
    task_arithmetic,
    spherical,
    model_stock,
    sce,
    nearswap,
    arcee_fusion,
    ram,
    passthrough,
    drm,
    pcb,
    subspace,
    wudi,
    data_aware,
    dam,
)
from mergesmith.methods.base import (
    REQUIRED,
    BasePolicy,
    MethodSpec,
    Param,
    TensorGroup,
    all_methods,
    get_method,
    register,
)

__all__ = ["REQUIRED", "BasePolicy", "MethodSpec", "Param", "TensorGroup",
           "all_methods", "get_method", "register"]
