"""Mixtures of experts from dense experts, from mergekit-moe's YAML unchanged. See docs/moe.md.

    from mergesmith.moe import build_moe
    build_moe("moe.yml", "out/moe", device="cuda")
"""

from mergesmith.moe.build import MoEOptions, MoEResult, build_moe
from mergesmith.moe.config import MoEConfig, read_moe_config
from mergesmith.moe.plan import MoEPlan, plan_moe

__all__ = ["MoEConfig", "MoEOptions", "MoEPlan", "MoEResult", "build_moe", "plan_moe", "read_moe_config"]
