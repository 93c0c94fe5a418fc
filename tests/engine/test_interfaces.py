"""The engine's interfaces: the stream feeds any target, and statistics come from any source.

The engine defines both (``engine.targets.Target``, ``engine.plan.StatisticsSource``) and knows
no implementation above it: a resident model is a target as a model folder is, and a source
that is not ``calibrate`` serves a data-aware method as well.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pytest
import torch

import mergesmith
from mergesmith.api import plan_merge as plan_with_calibration
from mergesmith.checkpoint.memory import ModelWriter
from mergesmith.engine import MergeOptions, ModelTarget, plan_merge, row_spans
from mergesmith.engine.run import merge
from mergesmith.engine.stream import stream
from mergesmith.errors import InputError
from tiny_models import load_state

TINY_CHUNK = 100  # bytes: blocks of a row or a few


def task_arithmetic(base, fts) -> dict:
    return {"merge_method": "task_arithmetic", "base_model": str(base), "dtype": "float32",
            "models": [{"model": str(m), "parameters": {"weight": w}} for m, w in zip(fts, (0.7, 0.4, 0.9))]}


def resident_model(plan):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(plan.out_config)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


@pytest.mark.parametrize("chunk_bytes", [0, TINY_CHUNK])
def test_the_stream_fills_a_resident_model_as_it_writes_a_model_folder(model_family, tmp_path, chunk_bytes):
    from transformers import AutoModelForCausalLM

    base, fts = model_family("llama", 3)
    recipe = task_arithmetic(base, fts)
    mergesmith.merge(recipe, tmp_path / "out", progress=False)
    options = MergeOptions(progress=False, chunk_bytes=chunk_bytes)
    plan = plan_merge(recipe, options)
    try:
        blocked = [t.name for t in plan.tensors if row_spans(plan, t, chunk_bytes) != [None]]
        assert bool(blocked) == bool(chunk_bytes)  # with a tiny chunk, blocks of rows reach the target
        model = resident_model(plan)
        stream(plan, ModelTarget(ModelWriter(model)), options)
    finally:
        for m in plan.models:
            m.checkpoint.close()
    disk = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).state_dict()
    live = model.state_dict()
    assert set(live) == set(disk)
    for name, tensor in disk.items():
        assert torch.equal(live[name], tensor), name


def test_a_resident_model_missing_a_block_is_refused_at_the_finish(model_family):
    base, fts = model_family("llama", 3)
    plan = plan_merge(task_arithmetic(base, fts))
    try:
        target = ModelTarget(ModelWriter(resident_model(plan)))
        with target:
            for task in plan.tensors:
                rows = torch.zeros(task.shape)
                if task.name == "model.embed_tokens.weight":
                    target.write(task.name, rows[:10], row=0)  # the other rows never come
                else:
                    target.write(task.name, rows)
            with pytest.raises(InputError, match="wrote no value for 1 tensors.*embed_tokens"):
                target.finish()
    finally:
        for m in plan.models:
            m.checkpoint.close()


@dataclass(frozen=True)
class QuarterCoefficient:
    """A per-column coefficient of 0.25 for every input, held in memory rather than in a file."""

    shape: tuple[int, ...]
    value: Optional[float] = None

    @property
    def nbytes(self) -> int:
        return 4 * self.shape[0]

    def read(self, rows=None) -> torch.Tensor:
        return torch.full(self.shape, 0.25)


class QuarterCoefficients:
    """A statistics source that is not calibrate: dam's coefficients, 0.25 for every matrix."""

    def input_files(self, recipe) -> dict:
        return {}

    def plan(self, plan):
        for task in plan.tensors:
            if len(task.shape) == 2:
                task.stats = [{"coefficients": QuarterCoefficient((task.shape[1],))} for _ in task.inputs]
        return None


def test_any_statistics_source_serves_a_data_aware_method(model_family, tmp_path):
    _, fts = model_family("llama", 3)
    a, b = fts[:2]
    recipe = {"merge_method": "dam", "dtype": "float32", "parameters": {"coefficients": "held-in-memory"},
              "models": [{"model": str(a)}, {"model": str(b)}]}
    merge(recipe, tmp_path / "out", progress=False, statistics=QuarterCoefficients())
    out, sa, sb = load_state(tmp_path / "out"), load_state(a), load_state(b)
    for name, tensor in out.items():
        share = 0.25 if tensor.dim() == 2 else 0.5  # no coefficient: 1/N
        assert torch.equal(tensor, sa[name] * share + sb[name] * share), name


def test_without_a_source_a_data_aware_recipe_is_one_problem_naming_the_fix(model_family, tmp_path):
    _, fts = model_family("llama", 3)
    recipe = {"merge_method": "dam", "parameters": {"coefficients": str(tmp_path / "coefficients.safetensors")},
              "models": [{"model": str(m)} for m in fts[:2]]}
    with pytest.raises(InputError, match="merge_method dam reads statistics beside the weights.*mergesmith.api"):
        plan_merge(recipe)
    with pytest.raises(InputError, match="coefficients.safetensors: no such file"):  # calibrate's source answers
        plan_with_calibration(recipe)
