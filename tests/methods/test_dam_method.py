"""The dam merge step, and how a recipe's coefficient file reaches it (calibrate.stats_file)."""

import pytest
import torch
import yaml
from safetensors.torch import save_file

from mergesmith import merge
from mergesmith.errors import InputError
from mergesmith.methods import TensorGroup, get_method
from tiny_models import load_state


def run_dam(tensors, coefficients):
    stats = [{} if c is None else {"coefficients": c} for c in coefficients]
    return get_method("dam").fn(TensorGroup(name="w", tensors=tensors, params={"coefficients": "f"},
                                            model_params=[{} for _ in tensors], stats=stats))


def test_dam_hand_computed_2x3():
    # Two models, a [2, 3] weight ([out, in]): each coefficient scales one input column.
    a = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    b = torch.tensor([[10.0, 20.0, 30.0], [40.0, 50.0, 60.0]])
    ca = torch.tensor([1.0, 0.5, 0.0])
    cb = torch.tensor([0.0, 0.1, 2.0])
    out = run_dam([a, b], [ca, cb])
    # column 0: 1*a + 0*b; column 1: 0.5*a + 0.1*b; column 2: 0*a + 2*b
    expected = torch.tensor([[1.0, 1.0 + 2.0, 60.0], [4.0, 2.5 + 5.0, 120.0]])
    assert torch.allclose(out, expected)


def test_dam_without_entries_is_the_average():
    a, b, c = torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4)
    assert torch.allclose(run_dam([a, b, c], [None, None, None]), (a + b + c) / 3, atol=1e-6)
    assert torch.allclose(get_method("dam").fn(TensorGroup("w", [a, b], {"coefficients": "f"}, [{}, {}])),
                          (a + b) / 2, atol=1e-6)


def test_dam_one_model_with_unit_coefficients_is_identity():
    a = torch.randn(5, 4)
    assert torch.equal(run_dam([a], [torch.ones(4)]), a)


# ----------------------------------------------------------------------------- the coefficient file


def _recipe(tmp_path, variants, coefficients):
    recipe = {"merge_method": "dam", "models": [{"model": str(v)} for v in variants],
              "parameters": {"coefficients": str(coefficients)}}
    path = tmp_path / "dam.yml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_recipe_file_coefficients_reach_the_method(tmp_path, model_family):
    _, (m0, m1) = model_family("llama", 2)
    s0, s1 = load_state(m0), load_state(m1)
    name = "model.layers.1.mlp.down_proj.weight"  # [16, 32]
    c0, c1 = torch.linspace(0, 1, 32), torch.linspace(1, -1, 32)
    save_file({f"{name}:0": c0, f"{name}:1": c1}, tmp_path / "c.safetensors")
    merge(_recipe(tmp_path, [m0, m1], tmp_path / "c.safetensors"), tmp_path / "out", progress=False)
    out = load_state(tmp_path / "out")
    assert torch.allclose(out[name], s0[name] * c0 + s1[name] * c1, atol=1e-6)
    other = "model.layers.1.mlp.up_proj.weight"  # no entry: the average
    assert torch.allclose(out[other], (s0[other] + s1[other]) / 2, atol=1e-6)


def test_bad_coefficient_files_are_one_input_error_before_work(tmp_path, model_family):
    _, (m0, m1) = model_family("llama", 2)
    name = "model.layers.0.mlp.down_proj.weight"  # [16, 32]: one value per column is [32]
    save_file({f"{name}:0": torch.ones(16), f"{name}:1": torch.ones(1, 32), "model.nope.weight:0": torch.ones(3),
               f"{name}:2": torch.ones(32)}, tmp_path / "bad.safetensors")
    with pytest.raises(InputError) as err:
        merge(_recipe(tmp_path, [m0, m1], tmp_path / "bad.safetensors"), tmp_path / "out", progress=False)
    text = str(err.value)
    assert f"entry {name}:0 has shape [16]" in text and "[32]" in text
    assert f"{name}:1" not in text.split("match no input")[0]  # [1, 32] broadcasts: fine
    assert "2 entries match no input" in text and "model.nope.weight:0" in text and f"{name}:2" in text
    assert not (tmp_path / "out").exists()

    with pytest.raises(InputError, match="no such file"):
        merge(_recipe(tmp_path, [m0, m1], tmp_path / "missing.safetensors"), tmp_path / "out", progress=False)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(InputError, match="not a readable safetensors file"):
        merge(_recipe(tmp_path, [m0, m1], tmp_path / "junk.safetensors"), tmp_path / "out", progress=False)


def test_the_coefficient_file_counts_as_an_input(tmp_path, model_family):
    _, (m0, m1) = model_family("llama", 2)
    out = tmp_path / "out"
    out.mkdir()
    save_file({}, out / "c.safetensors")
    with pytest.raises(InputError, match="c.safetensors"):
        merge(_recipe(tmp_path, [m0, m1], out / "c.safetensors"), out, progress=False, overwrite=True)
