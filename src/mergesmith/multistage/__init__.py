"""Multi-stage recipes (mergekit-multi's format): merges whose inputs may be earlier merges.

A multi-stage recipe is a list of plans whose inputs may be earlier outputs: ``stages.py`` reads
the YAML documents and checks how they refer to each other, ``plan.py`` keys and checks every
stage before any runs, ``run.py`` merges them in order through ``api.merge``, reusing cached
intermediates, and ``cli.py`` is ``mergesmith multi``. See docs/multistage.md.
"""

from mergesmith.multistage.plan import MultiPlan, StagePlan, default_intermediate_dir, plan_multi
from mergesmith.multistage.run import MultiResult, run_multi
from mergesmith.multistage.stages import Stage, read_stages

__all__ = ["MultiPlan", "MultiResult", "Stage", "StagePlan", "default_intermediate_dir", "plan_multi",
           "read_stages", "run_multi"]
