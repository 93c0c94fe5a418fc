"""The proving ground: a model zoo we train ourselves, and the benchmark over it.

``build_zoo(size, seed, cache_dir)`` returns a ``Zoo`` with paths to a pretrained
Llama base, one fully fine-tuned expert per trained skill, LoRA experts (PEFT
format), a multitask model, and task files per split. See docs/zoo.md.

Names are imported on first use, so that ``mergesmith --help`` does not pay for
importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Zoo": "build", "build_zoo": "build", "default_cache": "build", "zoo_root": "build",
    "SKILLS": "skills", "TRAINED": "skills", "HELDOUT": "skills",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mergesmith.zoo' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"mergesmith.zoo.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
