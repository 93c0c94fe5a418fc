"""The in-memory merge target: a candidate merged into a resident model equals `mergesmith merge` to disk."""

from __future__ import annotations

import pytest
import torch

import mergesmith
from mergesmith.checkpoint.memory import ModelWriter
from mergesmith.errors import InputError
from mergesmith.search.candidate import ResidentMerger


def _recipe(base, variants, method="ties", **params):
    return {"merge_method": method, "base_model": str(base), "dtype": "float32", "random_seed": 3,
            "parameters": {"normalize": True} if method != "task_arithmetic" else {},
            "models": [{"model": str(v), "parameters": {"weight": w, "density": d, **params}}
                       for v, w, d in zip(variants, (0.7, 0.4, 0.9), (0.5, 0.8, 0.3))]}


def _disk_state(recipe, out):
    from transformers import AutoModelForCausalLM

    mergesmith.merge(recipe, out, progress=False)
    return AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()


@pytest.mark.parametrize("arch,method", [("llama", "ties"), ("llama", "dare_ties"), ("gemma", "task_arithmetic")])
def test_resident_model_equals_the_merge_written_to_disk(model_family, tmp_path, arch, method):
    base, variants = model_family(arch, 3)
    recipe = _recipe(base, variants, method)
    merger = ResidentMerger()
    merger.merge(recipe)
    disk = _disk_state(recipe, tmp_path / "out")
    live = merger.model.state_dict()
    assert set(live) == set(disk)
    for name, tensor in disk.items():
        assert torch.equal(live[name], tensor), name  # bit for bit, tied lm_head included


def test_inputs_are_read_once_and_reused_across_candidates(model_family, tmp_path):
    base, variants = model_family("llama", 3)
    merger = ResidentMerger()
    merger.merge(_recipe(base, variants))
    reads = merger.cache.reads
    assert reads > 0
    second = _recipe(base, variants)
    for m in second["models"]:
        m["parameters"]["weight"] = 0.2  # another candidate of the same space
    merger.merge(second)
    assert merger.cache.reads == reads  # nothing read again
    # ... and the cached copies were not damaged by the first merge (methods work in place):
    disk = _disk_state(second, tmp_path / "second")
    live = merger.model.state_dict()
    assert all(torch.equal(live[n], t) for n, t in disk.items())
    # A candidate dropping a model still merges right (model selection).
    third = _recipe(base, variants[:2])
    merger.merge(third)
    disk = _disk_state(third, tmp_path / "third")
    assert all(torch.equal(merger.model.state_dict()[n], t) for n, t in disk.items())


def test_model_writer_refuses_unknown_and_unwritten_tensors():
    lin = torch.nn.Linear(2, 2)
    writer = ModelWriter(lin)
    writer.begin()
    with pytest.raises(InputError, match="no place"):
        writer.write("nope", torch.zeros(2))
    with pytest.raises(InputError, match="shape"):
        writer.write("weight", torch.zeros(3, 2))
    writer.write("weight", torch.ones(2, 2))
    with pytest.raises(InputError, match="bias"):
        writer.finish()  # bias would keep the previous candidate's values
    writer.write("bias", torch.full((2,), 2.0, dtype=torch.float64))
    writer.finish()
    assert torch.equal(lin.weight, torch.ones(2, 2)) and torch.equal(lin.bias, torch.full((2,), 2.0))
