"""Merge a candidate recipe into a resident model, with the inputs read once.

``ResidentMerger`` is what each search worker holds: an ``InputCache`` (every input
tensor it has read, in the compute dtype) and one ``transformers`` model that each
candidate is merged into through the engine's ``ModelTarget`` (the interface the
stream writes model folders through). It uses the engine's public planning and
per-tensor merge (``plan_merge``, ``load_inputs``, ``merge_tensor``), so a candidate's
weights are exactly those ``mergesmith merge`` writes for the same recipe.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional, Union

import torch

from mergesmith.api import plan_merge
from mergesmith.checkpoint.memory import ModelWriter
from mergesmith.engine.merge_plan import MergePlan, TensorPlan
from mergesmith.engine.options import MergeOptions
from mergesmith.engine.targets import ModelTarget
from mergesmith.engine.tensor import load_inputs, merge_tensor
from mergesmith.errors import InputError


class InputCache:
    """Input tensors by (model, tensor, rows), read once and handed out as copies.

    The copies matter: methods may work in place on their inputs (``TensorGroup.disposable``).
    """

    def __init__(self) -> None:
        self.tensors: dict[tuple, torch.Tensor] = {}
        self.reads = 0  # tensors read from disk, for tests and throughput figures

    @staticmethod
    def _key(plan: MergePlan, task: TensorPlan, k: int) -> tuple:
        ref = task.inputs[k]
        # Padded vocabulary rows come from the reference model, so the reference is part of the key.
        reference = plan.models[plan.reference].ref if ref.rows is not None else None
        return plan.models[ref.model].ref, ref.name, ref.rows, reference, plan.compute_dtype

    def inputs(self, plan: MergePlan, task: TensorPlan, device: torch.device) -> list[torch.Tensor]:
        keys = [self._key(plan, task, k) for k in range(len(task.inputs))]
        if any(key not in self.tensors for key in keys):
            loaded, _ = load_inputs(plan, task, device)
            self.reads += len(loaded)
            for key, tensor in zip(keys, loaded):
                self.tensors.setdefault(key, tensor)
        return [self.tensors[key].clone() for key in keys]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


class ResidentMerger:
    """Merge recipes into one resident model; evaluate it with ``mergesmith.evaluate``."""

    def __init__(self, device: str = "cpu", threads: Optional[int] = None):
        self.device = torch.device(device)
        if threads:
            torch.set_num_threads(threads)
        self.cache = InputCache()
        self.model: Any = None
        self.tokenizer: Any = None
        self.writer: Optional[ModelWriter] = None
        self._config_key: Optional[str] = None
        self._tokenizer_path: Optional[Path] = None
        # One-time work in the last merge and evaluation: building the resident model, loading the
        # tokenizer (0 when they were reused), kept out of the per-candidate times.
        self.setup_s = 0.0

    def merge(self, recipe: Union[dict, str, Path]) -> float:
        """Merge ``recipe`` into the resident model; returns the seconds it took, less building the
        resident model (once per worker: ``setup_s``)."""
        start = time.perf_counter()
        plan = plan_merge(recipe, MergeOptions(progress=False))
        try:
            if plan.stats is not None or any(t.stats is not None for t in plan.tensors):
                # The cache holds weights only; statistics would have to be computed per candidate.
                raise InputError(f"merge_method {plan.recipe.method.name} needs calibration statistics, "
                                 "which search does not support yet; offer another method")
            built = time.perf_counter()
            self._ensure_model(plan)
            self.setup_s = time.perf_counter() - built
            start += self.setup_s
            assert self.writer is not None
            with ModelTarget(self.writer) as target:
                for task in plan.tensors:
                    tensors = self.cache.inputs(plan, task, self.device)
                    target.write(task.name, merge_tensor(plan, task, self.device, inputs=tensors))
                target.finish()
        finally:
            for m in plan.models:
                m.checkpoint.close()
        return time.perf_counter() - start

    def evaluate(self, tasks: list, *, deadline: Optional[float] = None, batch_size: int = 16) -> Any:
        """The harness's ``EvalResult`` for the model as last merged (no bootstrap, no progress bar)."""
        from mergesmith.evaluate import evaluate
        from transformers import AutoTokenizer

        if self.tokenizer is None:
            started = time.perf_counter()
            self.tokenizer = AutoTokenizer.from_pretrained(str(self._tokenizer_path), trust_remote_code=False)
            self.setup_s += time.perf_counter() - started
        return evaluate(self.model, tasks, tokenizer=self.tokenizer, batch_size=batch_size, bootstrap=0,
                        progress=False, deadline=deadline)

    def _ensure_model(self, plan: MergePlan) -> None:
        """Build the resident model from the plan's output config, once per distinct config."""
        key = json.dumps(plan.out_config, sort_keys=True)
        if key == self._config_key:
            return
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = dict(plan.out_config)
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        # float32 on CPU: what the harness loads a written checkpoint as (dtype auto), so that a
        # candidate scores exactly as its merge written to disk would.
        dtype = torch.float32 if self.device.type == "cpu" else plan.tensors[0].out_dtype
        self.model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(self.device).eval()
        self.tokenizer = None  # loaded on the first evaluation: merging alone needs none
        self._tokenizer_path = _tokenizer_folder(plan)
        self.writer = ModelWriter(self.model)
        self._config_key = key


def _tokenizer_folder(plan: MergePlan) -> Path:
    source = plan.recipe.tokenizer_source
    for m in plan.models:
        if source not in (None, "base", "union") and m.ref == source:
            return m.path
    return plan.models[plan.reference].path
