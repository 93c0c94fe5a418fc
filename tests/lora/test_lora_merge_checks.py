"""merge-lora refuses what it cannot merge, naming it, every problem at once, before any weight is read."""

from __future__ import annotations

import json

import pytest

from mergesmith.cli import main
from mergesmith.errors import InputError
from mergesmith.lora.merge import merge_lora
from tests.lora.lora_fixtures import make_adapter, write_recipe
from tests.tiny_models import make_model


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-checks")
    base = make_model(root / "base", "llama", seed=0)
    plain = make_adapter(base, root / "plain", seed=1)
    dora = make_adapter(base, root / "dora", seed=2, use_dora=True)
    other = make_model(root / "wide", "llama", seed=0, intermediate=48)
    wide = make_adapter(other, root / "wide-adapter", seed=3, target_modules=["down_proj"])
    return base, plain, dora, wide


def test_every_problem_at_once_and_nothing_written(adapters, tmp_path):
    base, plain, dora, wide = adapters
    recipe = write_recipe(tmp_path / "r.yml", "ties", [plain, dora, wide, tmp_path / "missing"],
                          [{"weight": 1, "density": 1.5}, {"weight": 1}, {"weight": 1}, {"weight": 1}],
                          parameters={"rank": 0, "colour": "red"}, base_model=str(base))
    with pytest.raises(InputError) as err:
        merge_lora(recipe, tmp_path / "out", progress=False)
    text = str(err.value)
    assert "DoRA" in text and "use_dora" in text
    assert "lora_magnitude_vector" in text  # the DoRA tensors are named too
    assert "missing is not a folder" in text
    # and, in the same round, what is wrong with the parameters
    assert "models[0].parameters.density = 1.5 must be in (0, 1]" in text
    assert "parameters.rank = 0 must be in [1, inf)" in text and "parameters.colour" in text
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*partial*"))


def test_parameter_and_shape_problems_are_listed_together(adapters, tmp_path):
    base, plain, _, wide = adapters
    recipe = write_recipe(tmp_path / "r.yml", "ties", [plain, wide],
                          [{"weight": 1, "density": 1.5}, {"weight": 1, "colour": 2}],
                          parameters={"rank": 0, "colour": "red"}, base_model=str(base))
    with pytest.raises(InputError) as err:
        merge_lora(recipe, tmp_path / "out", progress=False)
    problems = err.value.problems
    text = "\n".join(problems)
    assert "models[0].parameters.density = 1.5 must be in (0, 1]" in text
    assert "models[1].parameters.colour is not a per-adapter parameter" in text
    assert "parameters.colour is not a parameter of ties" in text
    assert "parameters.rank = 0 must be in [1, inf)" in text
    assert "down_proj changes a [16, 48] weight" in text  # the adapter of another model
    assert len(problems) == len(set(problems))  # each problem once, not once per module


def test_methods_that_cannot_merge_adapters_are_named(adapters, tmp_path):
    _, plain, _, _ = adapters
    recipe = write_recipe(tmp_path / "r.yml", "regmean", [plain, plain])
    with pytest.raises(InputError, match="regmean.*cannot merge adapters.*calibration.*choose one of: concat"):
        merge_lora(recipe, tmp_path / "out", progress=False)


def test_cli_merges_refuses_an_existing_output_and_dry_runs(adapters, tmp_path, capsys):
    _, plain, _, _ = adapters
    recipe = write_recipe(tmp_path / "r.yml", "concat", [plain, plain], [{"weight": 0.5}, {"weight": 0.5}])
    assert main(["merge-lora", str(recipe), str(tmp_path / "out"), "--dry-run"]) == 0
    assert "dry run: nothing written" in capsys.readouterr().out and not (tmp_path / "out").exists()
    assert main(["merge-lora", str(recipe), str(tmp_path / "out"), "--no-progress"]) == 0
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["rank_pattern"] == {}
    assert main(["merge-lora", str(recipe), str(tmp_path / "out"), "--no-progress"]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert main(["merge-lora", str(recipe), str(plain), "--no-progress", "--overwrite"]) == 2
    assert "would destroy it" in capsys.readouterr().err


@pytest.mark.parametrize("options, named", [({"lora_bias": True}, "lora_bias"),
                                            ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
                                            ({"use_rslora": True, "use_dora": True}, "DoRA")])
def test_each_variant_is_refused_by_name(adapters, tmp_path, options, named):
    base = adapters[0]
    variant = make_adapter(base, tmp_path / "variant", seed=5, **options)
    recipe = write_recipe(tmp_path / "r.yml", "concat", [variant])
    with pytest.raises(InputError, match=f"{named}.*cannot be merged into a LoRA adapter"):
        merge_lora(recipe, tmp_path / "out", progress=False)
