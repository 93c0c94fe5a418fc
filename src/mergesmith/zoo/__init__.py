"""The proving ground: a model zoo we train ourselves, and the benchmark over it.

``build_zoo(size, seed, cache_dir)`` returns a ``Zoo`` with paths to a pretrained
Llama base, one fully fine-tuned expert per trained skill, LoRA experts (PEFT
format), a multitask model, and task files per split. See docs/zoo.md.
"""

from __future__ import annotations

from mergesmith.zoo.build import Zoo, build_zoo, default_cache, zoo_root
from mergesmith.zoo.skills import HELDOUT, SKILLS, TRAINED

__all__ = ["Zoo", "build_zoo", "default_cache", "zoo_root", "SKILLS", "TRAINED", "HELDOUT"]
