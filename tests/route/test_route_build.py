"""mergesmith route: the recipe checked up front, each router kind fitted, the folder written and checked."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from route_data import make_experts, write_recipe, write_task

from mergesmith.cli import main
from mergesmith.errors import InputError
from mergesmith.evaluate import evaluate
from mergesmith.route.build import RouteOptions, build_routed
from mergesmith.route.folder import read_routed
from mergesmith.route.recipe import looks_like_test


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_experts(tmp_path_factory.mktemp("route-models"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("route-data")
    train = {s: [write_task(root / "train" / "mc" / f"{s}.jsonl", s, n=8, seed=1)] for s in ("a", "b")}
    val = {s: write_task(root / "validation" / "mc" / f"{s}.jsonl", s, n=6, seed=2) for s in ("a", "b")}
    return train, val


@pytest.mark.parametrize("kind", ["centroid", "classifier", "perplexity", "oracle"])
def test_each_kind_builds_a_folder_that_routes_every_skill_to_its_expert(kind, models, data, tmp_path):
    train, val = data
    routed = build_routed(write_recipe(tmp_path / "route.yml", models, train, kind), tmp_path / "routed")
    assert (tmp_path / "routed" / "routed.json").is_file()
    assert [e.tasks for e in read_routed(routed.folder).experts] == [["a"], ["b"]]
    result = evaluate(tmp_path / "routed", [val["a"], val["b"]], bootstrap=0, progress=False)
    share = result.settings["routed"]["share_by_task"]
    if kind != "perplexity":  # the experts are noise around the base: their losses need not tell the skills apart
        assert share == {"a": {"a": 1.0}, "b": {"b": 1.0}}
    assert result.settings["routed"]["routing_forwards_per_item"] == {"centroid": 1, "classifier": 1,
                                                                      "perplexity": 2, "oracle": 0}[kind]
    assert all(p.expert in ("a", "b") for p in result.predictions)


def test_routed_answers_are_the_experts_own_answers(models, data, tmp_path):
    train, val = data
    build_routed(write_recipe(tmp_path / "route.yml", models, train, "centroid"), tmp_path / "routed")
    routed = evaluate(tmp_path / "routed", [val["a"], val["b"]], bootstrap=0, progress=False)
    for skill in ("a", "b"):
        alone = evaluate(models[skill], [val[skill]], bootstrap=0, progress=False)
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


def test_every_problem_is_reported_at_once_before_any_work(models, data, tmp_path, capsys):
    train, _ = data
    test_file = write_task(tmp_path / "test" / "mc" / "a.jsonl", "a")
    recipe = write_recipe(tmp_path / "route.yml", {**models, "b": tmp_path / "missing"},
                          {"a": [test_file], "b": train["b"]}, "classifier",
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


def test_unknown_kind_and_one_expert_are_refused(models, data, tmp_path):
    train, _ = data
    recipe = write_recipe(tmp_path / "route.yml", models, train, "vote")
    with pytest.raises(InputError, match="router.kind 'vote' is not known"):
        build_routed(recipe, tmp_path / "out")


def test_a_changed_expert_is_refused_when_loaded(models, data, tmp_path):
    train, val = data
    copies = {k: Path(shutil.copytree(v, tmp_path / k)) for k, v in models.items()}
    build_routed(write_recipe(tmp_path / "route.yml", copies, train, "oracle"), tmp_path / "routed")
    (copies["b"] / "config.json").write_text((copies["b"] / "config.json").read_text() + "\n")
    with pytest.raises(InputError) as err:
        evaluate(tmp_path / "routed", [val["a"]], bootstrap=0, progress=False)
    assert "expert 'b'" in str(err.value) and "config.json changed since the router was built" in str(err.value)
    assert "rebuild the routed model with mergesmith route" in str(err.value)


def test_copy_makes_the_folder_self_contained(models, data, tmp_path):
    train, val = data
    copies = {k: Path(shutil.copytree(v, tmp_path / "in" / k)) for k, v in models.items()}
    recipe = write_recipe(tmp_path / "route.yml", copies, train, "centroid")
    build_routed(recipe, tmp_path / "routed", options=RouteOptions(copy=True))
    shutil.rmtree(tmp_path / "in")
    moved = Path(shutil.move(tmp_path / "routed", tmp_path / "elsewhere"))
    result = evaluate(moved, [val["a"], val["b"]], bootstrap=0, progress=False)
    assert result.settings["routed"]["share_by_task"] == {"a": {"a": 1.0}, "b": {"b": 1.0}}
    assert all(not Path(e.ref).is_absolute() for e in read_routed(moved).experts)
