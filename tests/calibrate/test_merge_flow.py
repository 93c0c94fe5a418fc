"""The whole flow on tiny models: a recipe with a calibration block, merge, the cache reused; recipe checks."""

from __future__ import annotations

import os

import pytest
import torch
import yaml

import mergesmith
import mergesmith.calibrate as calibrate
from mergesmith.api import plan_merge
from mergesmith.calibrate import StatsStore
from mergesmith.cli import main
from mergesmith.errors import InputError
from mergesmith.methods import TensorGroup, get_method
from mergesmith.recipe import load_recipe
from calibration_data import write_calibration
from tiny_models import load_state


def recipe_for(method, models, data, cache, **extra):
    recipe = {"merge_method": method, "models": [{"model": str(m)} for m in models],
              "calibration": {"files": [str(data)], "samples": 5, "max_length": 8, "batch_size": 2,
                              "cache_dir": str(cache)}}
    recipe.update(extra)
    return recipe


def test_regmean_merges_end_to_end_and_reuses_the_cache(tmp_path, model_family, monkeypatch):
    _, (a, b, _) = model_family()
    data = write_calibration(tmp_path / "cal.jsonl")
    recipe = recipe_for("regmean", [a, b], data, tmp_path / "cache", parameters={"alpha": 0.5})
    first = mergesmith.merge(recipe, tmp_path / "out1", progress=False)
    assert len(first.plan.stats.computed) == 2
    merged = load_state(tmp_path / "out1")
    inputs = [load_state(a), load_state(b)]

    name = "model.layers.1.mlp.up_proj.weight"
    stores = [StatsStore(m.folders["gram"]) for m in first.plan.stats.models]
    grams = [StatsStore.read(s.refs(name)["gram"]) for s in stores]
    group = TensorGroup(name, [x[name] for x in inputs], {"alpha": 0.5}, [{}, {}], stats=[{"gram": g} for g in grams])
    torch.testing.assert_close(merged[name], get_method("regmean").fn(group))
    assert not torch.allclose(merged[name], (inputs[0][name] + inputs[1][name]) / 2, atol=1e-4)
    norm = "model.layers.1.input_layernorm.weight"  # no Gram: the paper's plain average
    torch.testing.assert_close(merged[norm], (inputs[0][norm] + inputs[1][norm]) / 2)

    def no_recomputation(*args, **kwargs):
        raise AssertionError("statistics were recomputed although cached")

    monkeypatch.setattr(calibrate, "collect_grams", no_recomputation)
    second = mergesmith.merge(recipe, tmp_path / "out2", progress=False)
    assert second.plan.stats.computed == []
    torch.testing.assert_close(load_state(tmp_path / "out2")[name], merged[name], rtol=0, atol=0)


def test_fisher_with_per_model_data_and_a_cache_key_that_follows_the_inputs(tmp_path, model_family):
    _, (a, b, _) = model_family()
    data = write_calibration(tmp_path / "cal.jsonl")
    own = write_calibration(tmp_path / "own.jsonl", offset=5)
    recipe = recipe_for("fisher", [a, b], data, tmp_path / "cache")
    recipe["models"][1]["calibration"] = {"files": [str(own)]}
    result = mergesmith.merge(recipe, tmp_path / "out", progress=False)
    entries = result.plan.stats.models
    assert [e.settings.files for e in entries] == [(str(data),), (str(own),)]
    assert all((e.folders["fisher"] / "index.json").is_file() for e in entries)
    name = "model.layers.0.self_attn.o_proj.weight"
    task = next(t for t in result.plan.tensors if t.name == name)
    assert [sorted(refs) for refs in task.stats] == [["fisher", "fisher_norm"]] * 2  # the plan records both inputs'
    stats = [{k: StatsStore.read(r) for k, r in refs.items()} for refs in task.stats]
    inputs = [load_state(a)[name], load_state(b)[name]]
    group = TensorGroup(name, inputs, {"epsilon": 1e-6, "normalize_fisher": True}, [{"weight": 1.0}] * 2, stats=stats)
    expected = get_method("fisher").fn(group)
    torch.testing.assert_close(load_state(tmp_path / "out")[name], expected)
    assert not torch.allclose(expected, (inputs[0] + inputs[1]) / 2, atol=1e-5)

    def folder(rec):
        plan = plan_merge(rec)
        try:
            return plan.stats.models[0].folders["fisher"]
        finally:
            for m in plan.models:
                m.checkpoint.close()

    before = folder(recipe)
    assert folder({**recipe, "calibration": {**recipe["calibration"], "max_length": 9}}) != before
    config = a / "config.json"
    os.utime(config, ns=(config.stat().st_atime_ns, config.stat().st_mtime_ns + 10 ** 9))
    assert folder(recipe) != before  # a touched model file is another model


def test_cli_calibrate_then_dry_run_shows_the_memory_bound(tmp_path, model_family, capsys):
    _, (a, b, _) = model_family()
    data = write_calibration(tmp_path / "cal.jsonl")
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(recipe_for("regmean", [a, b], data, tmp_path / "cache")))
    assert main(["merge", str(path), str(tmp_path / "out"), "--dry-run"]) == 0
    assert "gram; 0 cached, to compute before merging: " in capsys.readouterr().out
    assert not (tmp_path / "cache").exists()  # a dry run computes nothing
    assert main(["calibrate", str(path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert out.count(": gram: cached in ") == 2
    assert main(["merge", str(path), str(tmp_path / "out"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "statistics:      gram; 2 cached" in out and "calibration peak memory: about" in out


def test_recipe_checks_name_the_field_and_the_fix(tmp_path, model_family):
    _, (a, b, _) = model_family()
    data = write_calibration(tmp_path / "cal.jsonl")
    plain = {"merge_method": "regmean", "models": [{"model": str(a)}, {"model": str(b)}]}
    with pytest.raises(InputError, match="regmean needs calibration data .* add a calibration: block"):
        load_recipe(plain)
    bad = recipe_for("fisher", [a, b], tmp_path / "nope.jsonl", tmp_path / "c")
    bad["calibration"].update(samples=0, memory="lots")
    with pytest.raises(InputError) as err:
        load_recipe(bad)
    text = str(err.value)
    assert "calibration.files[0] = " in text and "no such file" in text
    assert "calibration.samples = 0 must be at least 1" in text
    assert "calibration.memory = 'lots' must be a positive size" in text
    good = recipe_for("fisher", [a, b], data, tmp_path / "c")
    assert load_recipe(good).calibration.memory is None  # auto: resolved against each model when it runs
    good["calibration"]["memory"] = "auto"
    assert load_recipe(good).calibration.memory is None
    good["calibration"]["memory"] = "3MiB"
    assert load_recipe(good).calibration.memory == 3 * 2 ** 20
    only_one = {**plain, "models": [{"model": str(a), "calibration": {"files": [str(data)]}}, {"model": str(b)}]}
    with pytest.raises(InputError, match=r"models\[1\] \(.*\): regmean needs calibration data for every model.*"
                                         r"add models\[1\]\.calibration\.files"):
        load_recipe(only_one)
    with pytest.warns(UserWarning, match="calibration: is not used by merge_method linear"):
        load_recipe(recipe_for("linear", [a, b], data, tmp_path / "c", parameters={"weight": 1.0}))
    assert load_recipe({"merge_method": "linear", "models": [{"model": str(a)}, {"model": str(b)}],
                        "parameters": {"weight": 1.0}}).calibration is None


def test_answers_and_prompts_are_cached_apart(tmp_path, model_family):
    _, (a, b, _) = model_family()
    data = write_calibration(tmp_path / "cal.jsonl")
    prompts = recipe_for("regmean", [a, b], data, tmp_path / "cache")
    answers = recipe_for("regmean", [a, b], data, tmp_path / "cache")
    answers["calibration"]["include_answers"] = True
    first = mergesmith.merge(answers, tmp_path / "out1", progress=False)
    assert len(first.plan.stats.computed) == 2
    assert all(StatsStore(m.folders["gram"]).index["settings"]["include_answers"] for m in first.plan.stats.models)
    second = mergesmith.merge(prompts, tmp_path / "out2", progress=False)
    assert len(second.plan.stats.computed) == 2  # the entries on answers are not reused for prompts
    assert {m.folders["gram"] for m in first.plan.stats.models}.isdisjoint(
        m.folders["gram"] for m in second.plan.stats.models)
    name = "model.layers.0.mlp.down_proj.weight"
    assert not torch.allclose(load_state(tmp_path / "out1")[name], load_state(tmp_path / "out2")[name])

    def joint_folders(rec):  # RegMean++'s entries: planned, not computed
        plan = plan_merge({**rec, "merge_method": "regmean_plusplus"})
        try:
            return {m.folders["gram_plusplus"] for m in plan.stats.models}
        finally:
            for m in plan.models:
                m.checkpoint.close()

    assert joint_folders(prompts).isdisjoint(joint_folders(answers))


def test_answers_setting_and_missing_answers_are_reported_up_front(tmp_path, model_family):
    _, (a, b, _) = model_family()
    data = write_calibration(tmp_path / "cal.jsonl")
    bad = recipe_for("regmean", [a, b], tmp_path / "nope.jsonl", tmp_path / "c")
    bad["calibration"].update(include_answers="yes", samples=0)
    with pytest.raises(InputError) as err:
        load_recipe(bad)
    text = str(err.value)  # reported with the block's other problems
    assert "calibration.include_answers = 'yes' must be true or false" in text
    assert "calibration.samples = 0 must be at least 1" in text and "no such file" in text
    with pytest.raises(InputError, match=r"calibration\.taregts"):
        load_recipe({**bad, "calibration": {"files": [str(data)], "taregts": True}})  # a misspelt key

    unlabelled = tmp_path / "unlabelled.jsonl"
    unlabelled.write_text('{"id": "q0", "type": "multiple_choice", "prompt": "t4", "choices": ["t3", "t5"], '
                          '"answer": null}\n')
    recipe = recipe_for("fisher", [a, b], data, tmp_path / "c")
    recipe["models"][1]["calibration"] = {"files": [str(unlabelled)]}
    plan = plan_merge(recipe)  # prompts only: an unlabelled item is fine
    for m in plan.models:
        m.checkpoint.close()
    recipe["calibration"]["include_answers"] = True
    with pytest.raises(InputError, match=rf"{unlabelled}: 1 of 1 items have no gold answer .*needs an answer"):
        plan_merge(recipe)
    assert not (tmp_path / "c").exists()  # found before any model ran


def test_a_model_calibration_could_not_run_is_refused_when_planned(tmp_path, model_family):
    """Issue 20: calibration runs every input model; a model_type transformers does not know is named
    when the merge is planned, not by transformers once the statistics are computed."""
    from tiny_models import with_model_type

    _, (a, b, _) = model_family()
    odd = [with_model_type(m, tmp_path / m.name) for m in (a, b)]
    recipe = recipe_for("regmean", odd, write_calibration(tmp_path / "cal.jsonl"), tmp_path / "cache")
    with pytest.raises(InputError) as err:
        plan_merge(recipe)
    assert len(err.value.problems) == 2
    assert all("model_type 'fancy_llm'" in p and "trust_remote_code" in p for p in err.value.problems)


def test_a_cache_dir_under_a_file_is_a_recipe_problem(tmp_path, model_family):
    """Issue 20: calibration.cache_dir naming a file (or a folder under one) ended in 'error: ...: File
    exists' or 'Not a directory', exit 1, when the statistics were about to be written."""
    _, (a, b, _) = model_family()
    taken = tmp_path / "taken"
    taken.write_text("x")
    for cache in (taken, taken / "sub"):
        recipe = recipe_for("regmean", [a, b], write_calibration(tmp_path / "cal.jsonl"), cache)
        with pytest.raises(InputError, match=rf"calibration.cache_dir = {cache}: {taken} is a file, not a folder"):
            load_recipe(recipe)


@pytest.mark.parametrize("memory", [1.5, True, [1], {"size": 2}])
def test_a_calibration_memory_of_a_wrong_type_is_one_problem(tmp_path, model_family, memory):
    """Issue 20: the schema reported each branch of int | str, e.g. 'calibration.memory.int Input should
    be a valid integer' and 'calibration.memory.str Input should be a valid string'."""
    _, (a, b, _) = model_family()
    recipe = recipe_for("regmean", [a, b], write_calibration(tmp_path / "cal.jsonl"), tmp_path / "c")
    recipe["calibration"]["memory"] = memory
    with pytest.raises(InputError) as err:
        load_recipe(recipe)
    assert err.value.problems == [f"recipe: calibration.memory = {memory!r} must be a positive size like 2GiB or "
                                  "500MB, or auto (the default: a quarter of the model's float32 size, at most 2 GiB)"]


def test_bad_calibration_data_is_said_once_for_the_models_that_share_it(tmp_path, model_family):
    _, (a, b, _) = model_family()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(InputError) as err:
        plan_merge(recipe_for("regmean", [a, b], empty, tmp_path / "c"))
    assert err.value.problems == [f"recipe: calibration data: {empty}: no items; a task file needs at least one row"]
