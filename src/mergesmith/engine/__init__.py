"""The merge engine: a recipe is planned tensor by tensor, then streamed into a target.

Each room answers one question (docs/architecture.md draws the house):

    options.py     what the merge options are, and what is wrong with them
    models.py      which models the recipe names, opened (configs and headers only)
    layout.py      where each output tensor comes from (names, from the recipe's slices)
    merge_plan.py  what a plan is (MergePlan, TensorPlan), and what streaming it costs
    plan.py        how a recipe becomes a plan: plan_merge and its steps
    tensor.py      one planned tensor read and merged (load_inputs, merge_tensor)
    side_files.py  config, tokenizer and model card beside the weights
    targets.py     where merged tensors go (the Target interface; a model folder, a live model)
    stream.py      executing a plan: read, merge, write, overlapped
    run.py         merge(): plan, lock the output, compute missing statistics, stream

This module only hands on the names callers use.
"""

from mergesmith.engine.run import merge
from mergesmith.engine.merge_plan import InputRef, MergePlan, MergeResult, Span, TensorPlan, row_spans
from mergesmith.engine.models import ModelInfo, resolve_model_path
from mergesmith.engine.options import MergeOptions, option_problems
from mergesmith.engine.plan import plan_merge
from mergesmith.engine.stream import execute_plan
from mergesmith.engine.targets import CheckpointTarget, ModelTarget, Target
from mergesmith.engine.tensor import load_inputs, merge_tensor, nonfinite_counts

__all__ = ["CheckpointTarget", "InputRef", "MergeOptions", "MergePlan", "MergeResult", "ModelInfo", "ModelTarget", "Span",
           "Target", "TensorPlan", "execute_plan", "load_inputs", "merge", "merge_tensor", "nonfinite_counts", "option_problems",
           "plan_merge", "resolve_model_path", "row_spans"]
