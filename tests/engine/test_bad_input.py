"""Bad recipes and bad checkpoints: clear errors naming file and field, all at once, before weights."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

import mergesmith
from mergesmith.cli import main
from mergesmith.errors import InputError
from tiny_models import make_model


def write(tmp_path: Path, recipe: dict) -> Path:
    p = tmp_path / "recipe.yml"
    p.write_text(yaml.safe_dump(recipe))
    return p


def problems(recipe, tmp_path) -> list[str]:
    with pytest.raises(InputError) as err:
        mergesmith.merge(recipe, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    return err.value.problems


def test_unknown_method_lists_choices(tmp_path, model_family):
    _, (a, b, _) = model_family()
    [p] = problems({"merge_method": "tie", "models": [{"model": str(a)}]}, tmp_path)
    assert "merge_method = 'tie'" in p and "ties" in p


def test_every_problem_reported_at_once_with_file_and_field(tmp_path, model_family):
    base, (a, b, _) = model_family()
    path = write(tmp_path, {"merge_method": "ties", "base_model": str(base), "models": [
        {"model": str(a), "parameters": {"weight": 1.0, "density": 1.4}},
        {"model": str(b), "parameters": {"density": [0.5, -0.1]}},
        {"model": str(tmp_path / "nowhere"), "parameters": {"weight": 1.0}}]})
    found = problems(path, tmp_path)
    text = "\n".join(found)
    assert f"{path}: models[0].parameters.density = 1.4 must be in (0, 1]" in text
    assert "models[1].parameters.density[1] = -0.1 must be in (0, 1]" in text
    assert "models[1]" in text and "weight is required by ties" in text
    # Principle 5: the model folders are checked in the same round as the recipe.
    assert f"{tmp_path / 'nowhere'}: no such model folder" in text
    assert len(found) == 4


def test_missing_model_folder_named(tmp_path, model_family):
    base, (a, _, _) = model_family()
    missing = tmp_path / "nowhere"
    found = problems({"merge_method": "linear", "models": [{"model": str(a), "parameters": {"weight": 1}},
                                                            {"model": str(missing), "parameters": {"weight": 1}}]},
                     tmp_path)
    assert any(str(missing) in p and "no such model folder" in p for p in found)


def test_hub_id_offline_is_clear(tmp_path, monkeypatch, model_family):
    _, (a, _, _) = model_family()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    found = problems({"merge_method": "linear", "models": [{"model": str(a), "parameters": {"weight": 1}},
                                                            {"model": "someorg/somemodel", "parameters": {"weight": 1}}]},
                     tmp_path)
    assert any("someorg/somemodel" in p and "Hugging Face Hub" in p for p in found)


def test_base_required(tmp_path, model_family):
    _, (a, b, _) = model_family()
    found = problems({"merge_method": "ties", "models": [{"model": str(a), "parameters": {"weight": 1}},
                                                          {"model": str(b), "parameters": {"weight": 1}}]}, tmp_path)
    assert any("needs a base model" in p and "base_model" in p for p in found)


def test_missing_required_global_parameter(tmp_path, model_family):
    base, (a, _, _) = model_family()
    found = problems({"merge_method": "slerp", "base_model": str(base),
                      "models": [{"model": str(base)}, {"model": str(a)}]}, tmp_path)
    assert any("parameters.t is required by slerp" in p for p in found)


def test_weights_summing_to_zero_under_normalize(tmp_path, model_family):
    _, (a, b, _) = model_family()
    found = problems({"merge_method": "linear", "models": [{"model": str(a), "parameters": {"weight": 1.0}},
                                                            {"model": str(b), "parameters": {"weight": -1.0}}]},
                     tmp_path)
    assert any("sum to zero" in p and "normalize" in p for p in found)


def test_della_epsilon_bounds(tmp_path, model_family):
    base, (a, b, _) = model_family()
    found = problems({"merge_method": "della", "base_model": str(base), "models": [
        {"model": str(a), "parameters": {"weight": 1.0, "density": 0.9, "epsilon": 0.3}},
        {"model": str(b), "parameters": {"weight": 1.0, "density": 0.5, "epsilon": 0.1}}]}, tmp_path)
    assert any("epsilon" in p and "density" in p for p in found)


def test_layer_range_out_of_bounds(tmp_path, model_family):
    _, (a, _, _) = model_family()
    found = problems({"merge_method": "passthrough", "slices": [{"sources": [{"model": str(a), "layer_range": [0, 9]}]}]},
                     tmp_path)
    assert any("slices[0].sources[0].layer_range = [0, 9] is out of bounds" in p and "3 layers" in p for p in found)


def test_architectures_that_differ(tmp_path, model_family):
    _, (a, _, _) = model_family("llama")
    _, (q, _, _) = model_family("qwen2")
    found = problems({"merge_method": "linear", "models": [{"model": str(a), "parameters": {"weight": 1}},
                                                            {"model": str(q), "parameters": {"weight": 1}}]}, tmp_path)
    assert any("different architectures" in p and "Qwen2ForCausalLM" in p for p in found)


def test_shapes_that_do_not_line_up(tmp_path, model_family):
    _, (a, _, _) = model_family("llama")
    wide = make_model(tmp_path / "wide", "llama", intermediate=48)
    found = problems({"merge_method": "linear", "models": [{"model": str(a), "parameters": {"weight": 1}},
                                                            {"model": str(wide), "parameters": {"weight": 1}}]},
                     tmp_path)
    # Every mismatched tensor of every layer is reported, in one error.
    mismatched = [p for p in found if "do not line up" in p and "mlp" in p]
    assert len(mismatched) == 9 and all("[48, 16]" in p or "[16, 48]" in p for p in mismatched)


def test_different_layer_counts_need_slices(tmp_path, model_family):
    _, (a, _, _) = model_family()
    deep = make_model(tmp_path / "deep", "llama", layers=4)
    found = problems({"merge_method": "linear", "models": [{"model": str(a), "parameters": {"weight": 1}},
                                                            {"model": str(deep), "parameters": {"weight": 1}}]},
                     tmp_path)
    assert any("different layer counts" in p and "slices" in p for p in found)


def test_truncated_safetensors_reported_before_reading(tmp_path, model_family):
    _, (a, b, _) = model_family()
    broken = tmp_path / "broken"
    shutil.copytree(b, broken)
    f = broken / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    found = problems({"merge_method": "linear", "models": [{"model": str(a), "parameters": {"weight": 1}},
                                                            {"model": str(broken), "parameters": {"weight": 1}}]},
                     tmp_path)
    assert any(str(f) in p and "truncated" in p for p in found)


def test_corrupt_safetensors_header(tmp_path, model_family):
    _, (a, b, _) = model_family()
    broken = tmp_path / "broken"
    shutil.copytree(b, broken)
    f = broken / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"not json!!!!"
    f.write_bytes(bytes(data))
    found = problems({"merge_method": "linear", "models": [{"model": str(a), "parameters": {"weight": 1}},
                                                            {"model": str(broken), "parameters": {"weight": 1}}]},
                     tmp_path)
    assert any(str(f) in p and "corrupt" in p for p in found)


def test_structural_yaml_errors(tmp_path):
    path = write(tmp_path, {"merge_method": "linear", "models": [{"parameters": {"weight": 1}}], "dtpye": "x"})
    with pytest.warns(UserWarning, match="dtpye"):
        found = problems(path, tmp_path)
    assert any("models[0].model is required" in p for p in found)
    path = write(tmp_path, {"merge_method": "linear"})
    assert any("exactly one of models: or slices:" in p for p in problems(path, tmp_path))
    (tmp_path / "bad.yml").write_text("merge_method: [linear\n")
    assert any("not valid YAML" in p for p in problems(tmp_path / "bad.yml", tmp_path))


def test_cli_exit_codes(tmp_path, model_family, capsys):
    base, (a, b, _) = model_family()
    bad = write(tmp_path, {"merge_method": "ties", "models": [{"model": str(a)}]})
    assert main(["merge", str(bad), str(tmp_path / "out"), "--no-progress"]) == 2
    assert "needs a base model" in capsys.readouterr().err
    good = write(tmp_path, {"merge_method": "linear", "models": [{"model": str(a), "parameters": {"weight": 1}},
                                                                 {"model": str(b), "parameters": {"weight": 1}}]})
    assert main(["merge", str(good), str(tmp_path / "out"), "--no-progress"]) == 0
    # Refuses to overwrite, then overwrites when asked.
    assert main(["merge", str(good), str(tmp_path / "out"), "--no-progress"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["merge", str(good), str(tmp_path / "out"), "--no-progress", "--overwrite"]) == 0


def test_a_filter_list_that_matches_no_tensor_is_one_grouped_problem(tmp_path, model_family, capsys):
    """Issue 20: a per-model weight whose filters match no tensor ended in ``KeyError: 'weight'``, exit 1.
    Each tensor's resolution fell through and linear's weight check then read the missing value."""
    _, (a, b, _) = model_family()
    recipe = {"merge_method": "linear", "models": [
        {"model": str(a), "parameters": {"weight": [{"filter": "no_such_tensor", "value": 0.5}]}},
        {"model": str(b), "parameters": {"weight": 1.0}}]}
    [p] = problems(recipe, tmp_path)
    assert p.startswith(f"recipe: models[0] ({a}): weight has no value for 30 of 30 tensors (model.embed_tokens.weight, ")
    assert "and 27 more)" in p
    assert "models[0].parameters.weight = [{filter: no_such_tensor, value: 0.5}] matches none of them" in p
    assert "end the list with an entry without a filter" in p
    assert main(["merge", str(write(tmp_path, recipe)), str(tmp_path / "out"), "--no-progress"]) == 2
    assert "KeyError" not in capsys.readouterr().err


def test_filters_that_leave_some_tensors_without_a_value_name_every_setting_tried(tmp_path, model_family):
    base, (a, _, _) = model_family()
    found = problems({"merge_method": "slerp", "base_model": str(base),
                      "parameters": {"t": [{"filter": "mlp", "value": 0.5}]},
                      "slices": [{"sources": [{"model": str(base), "layer_range": [0, 3]},
                                              {"model": str(a), "layer_range": [0, 3]}],
                                  "parameters": {"t": [{"filter": "self_attn", "value": 0.3}]}}]}, tmp_path)
    # 3 layers of 9 tensors and 3 outside them: mlp and self_attn name 3 + 4 per layer.
    [p] = found
    assert p.startswith("recipe: slices[0]: t has no value for 9 of 30 tensors (model.embed_tokens.weight, ")
    assert ("slices[0].parameters.t = [{filter: self_attn, value: 0.3}] and "
            "parameters.t = [{filter: mlp, value: 0.5}] match none of them") in p


def test_an_empty_gradient_is_reported_by_the_recipe_check(tmp_path, model_family, capsys):
    """Issue 20: ``weight: []`` ended in ``KeyError: 'weight'``, exit 1."""
    _, (a, b, _) = model_family()
    recipe = {"merge_method": "linear", "models": [{"model": str(a), "parameters": {"weight": []}},
                                                    {"model": str(b), "parameters": {"weight": 1.0}}]}
    assert problems(recipe, tmp_path) == [
        "recipe: models[0].parameters.weight is an empty list, which gives no value; give a value, "
        "a gradient (a list of values) or a list of {filter, value}"]
    assert main(["merge", str(write(tmp_path, recipe)), str(tmp_path / "out"), "--no-progress"]) == 2


def test_a_check_that_fails_for_every_tensor_is_one_problem(tmp_path, model_family):
    """Found by the recipe property tests: consensus_k (default 2) with one fine-tune gave the same
    message once per tensor, 30 lines here, 50 and '... and N more' for a real model."""
    base, (a, _, _) = model_family()
    [p] = problems({"merge_method": "consensus_ta", "base_model": str(base),
                    "models": [{"model": str(base)}, {"model": str(a), "parameters": {"weight": 1.0}}]}, tmp_path)
    assert p.startswith("recipe: 30 of 30 tensors (model.embed_tokens.weight, ")
    assert "and 27 more): consensus_k = 2 but only 1 model(s) besides the base are merged" in p
