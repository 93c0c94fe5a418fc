"""mergesmith route: the recipe checked up front, each router kind fitted, the folder written and checked."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from route_data import write_recipe, write_task

from mergesmith.cli import main
from mergesmith.errors import InputError
from mergesmith.evaluate import evaluate
from mergesmith.route.build import RouteOptions, build_routed
from mergesmith.route.folder import read_routed
from mergesmith.route.recipe import looks_like_test


@pytest.mark.parametrize("kind", ["centroid", "classifier", "perplexity", "oracle"])
def test_each_kind_builds_a_folder_that_routes_every_skill_to_its_expert(kind, models, files, tmp_path):
    routed = build_routed(write_recipe(tmp_path / "route.yml", models, files, kind), tmp_path / "routed")
    assert (tmp_path / "routed" / "routed.json").is_file()
    assert [e.tasks for e in read_routed(routed.folder).experts] == [["a"], ["b"]]
    result = evaluate(tmp_path / "routed", [files["val_a"], files["val_b"]], bootstrap=0, progress=False)
    share = result.settings["routed"]["share_by_task"]
    if kind != "perplexity":  # the experts are noise around the base: their losses need not tell the skills apart
        assert share == {"a": {"a": 1.0}, "b": {"b": 1.0}}
    assert result.settings["routed"]["routing_forwards_per_item"] == {"centroid": 1, "classifier": 1,
                                                                      "perplexity": 2, "oracle": 0}[kind]
    assert all(p.expert in ("a", "b") for p in result.predictions)


def test_routed_answers_are_the_experts_own_answers(models, files, tmp_path):
    build_routed(write_recipe(tmp_path / "route.yml", models, files, "centroid"), tmp_path / "routed")
    routed = evaluate(tmp_path / "routed", [files["val_a"], files["val_b"]], bootstrap=0, progress=False)
    for skill in ("a", "b"):
        alone = evaluate(models[skill], [files[f"val_{skill}"]], bootstrap=0, progress=False)
        mine = [p for p in routed.predictions if p.task == skill]
        assert [p.id for p in mine] == [p.id for p in alone.predictions]
        assert [p.loglikelihoods for p in mine] == [p.loglikelihoods for p in alone.predictions]
        assert routed.task(skill).score == alone.task(skill).score


def test_test_like_files_are_refused_and_the_rule_is_said():
    assert looks_like_test("zoo/tasks-1/test/mc/arith.jsonl")
    assert looks_like_test("data/arith_test.jsonl")
    assert looks_like_test("data/heldout-arith.jsonl")
    assert looks_like_test("data/train/mc/arith.jsonl") is None
    assert looks_like_test("data/latest/contest.jsonl") is None  # words, not letters: contest is not test
    assert "train or validation files only" in looks_like_test("test/a.jsonl")


def test_every_problem_is_reported_at_once_before_any_work(models, files, tmp_path, capsys):
    test_file = write_task(tmp_path / "test" / "mc" / "a.jsonl", "a")
    recipe = write_recipe(tmp_path / "route.yml", {**models, "b": tmp_path / "missing"},
                          {"a": [test_file], "b": files["b"]}, "classifier",
                          fallback={"model": str(models["merged"]), "threshold": "auto"})
    (tmp_path / "out").mkdir()
    with pytest.raises(InputError) as err:
        build_routed(recipe, tmp_path / "out")
    text = str(err.value)
    assert "looks like a test file" in text and "'test'" in text
    assert "missing: a routed model names local folders" in text
    assert "fallback.validation" in text
    assert "already exists" in text
    assert main(["route", str(recipe), str(tmp_path / "out")]) == 2
    assert "looks like a test file" in capsys.readouterr().err


def test_unknown_kind_and_unknown_fields_are_refused(models, files, tmp_path):
    recipe = write_recipe(tmp_path / "route.yml", models, files, "vote")
    with pytest.raises(InputError, match="router.kind 'vote' is not known"):
        build_routed(recipe, tmp_path / "out")
    recipe = write_recipe(tmp_path / "one.yml", models, files, "centroid")
    recipe.write_text(recipe.read_text().replace("- data:", "- unknown: 1\n  data:", 1))
    with pytest.raises(InputError, match="experts.0.unknown|experts\\[0\\].unknown"):
        build_routed(recipe, tmp_path / "out")


def test_a_changed_expert_is_refused_when_loaded(models, files, tmp_path):
    copies = {k: Path(shutil.copytree(v, tmp_path / k)) for k, v in models.items()}
    build_routed(write_recipe(tmp_path / "route.yml", copies, files, "oracle"), tmp_path / "routed")
    (copies["b"] / "config.json").write_text((copies["b"] / "config.json").read_text() + "\n")
    with pytest.raises(InputError) as err:
        evaluate(tmp_path / "routed", [files["val_a"]], bootstrap=0, progress=False)
    assert "expert 'b'" in str(err.value) and "config.json changed since the router was built" in str(err.value)
    assert "rebuild the routed model with mergesmith route" in str(err.value)


def test_copy_makes_the_folder_self_contained(models, files, tmp_path):
    copies = {k: Path(shutil.copytree(v, tmp_path / "in" / k)) for k, v in models.items()}
    recipe = write_recipe(tmp_path / "route.yml", copies, files, "centroid")
    build_routed(recipe, tmp_path / "routed", options=RouteOptions(copy=True))
    shutil.rmtree(tmp_path / "in")
    moved = Path(shutil.move(tmp_path / "routed", tmp_path / "elsewhere"))
    result = evaluate(moved, [files["val_a"], files["val_b"]], bootstrap=0, progress=False)
    assert result.settings["routed"]["share_by_task"] == {"a": {"a": 1.0}, "b": {"b": 1.0}}
    assert all(not Path(e.ref).is_absolute() for e in read_routed(moved).experts)


def test_the_oracle_sends_unnamed_tasks_to_its_fallback_and_refuses_without_one(models, files, tmp_path):
    extra = write_task(tmp_path / "validation" / "mc" / "c.jsonl", "a", n=3, seed=9)  # a task no expert names
    recipe = write_recipe(tmp_path / "route.yml", models, files, "oracle", fallback={"model": str(models["merged"])})
    build_routed(recipe, tmp_path / "routed")
    result = evaluate(tmp_path / "routed", [files["val_a"], extra], bootstrap=0, progress=False)
    assert result.settings["routed"]["share_by_task"] == {"a": {"a": 1.0}, "c": {"fallback": 1.0}}
    build_routed(write_recipe(tmp_path / "bare.yml", models, files, "oracle"), tmp_path / "bare")
    with pytest.raises(InputError, match="names no expert for task\\(s\\) c"):
        evaluate(tmp_path / "bare", [extra], bootstrap=0, progress=False)
    cut = write_recipe(tmp_path / "cut.yml", models, files, "oracle",
                       fallback={"model": str(models["merged"]), "threshold": 0.5})
    with pytest.raises(InputError, match="leave out threshold and validation"):
        build_routed(cut, tmp_path / "cut")


def test_an_interrupted_build_leaves_nothing_behind(models, files, tmp_path, monkeypatch):
    import mergesmith.route.build as build

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(build, "ref_digests", interrupted)
    recipe = write_recipe(tmp_path / "route.yml", models, files, "centroid")
    with pytest.raises(KeyboardInterrupt):
        build_routed(recipe, tmp_path / "out" / "routed")
    assert list((tmp_path / "out").iterdir()) == []
