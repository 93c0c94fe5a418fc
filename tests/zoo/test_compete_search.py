"""compete with a search space on the test zoo's competition CSVs: a share of the budget searches on the
validation CSV, the best recipe is merged and predicts the hidden test CSV, all inside one budget."""

import csv
import json
import time

import pytest
import yaml

from mergesmith.cli import main
from mergesmith.errors import InputError
from mergesmith.evaluate.compete import DONE, compete
from mergesmith.search.space import is_search_space
from mergesmith.zoo.competition import write_competition

SKILLS = ["facts", "rule"]


@pytest.fixture(scope="module")
def csvs(zoo, tmp_path_factory):
    out = tmp_path_factory.mktemp("competition")
    write_competition(zoo, out)
    return out


def space_file(zoo, folder):
    space = {"merge_method": "ties", "base_model": str(zoo.base), "dtype": "float32",
             "parameters": {"normalize": True},
             "models": [{"model": str(zoo.experts[s]),
                         "parameters": {"weight": {"range": [0.2, 1]}, "density": {"range": [0.2, 1]}}}
                        for s in SKILLS]}
    path = folder / "space.yml"
    path.write_text(yaml.safe_dump(space))
    return path


def test_what_counts_as_a_search_space():
    plain = {"merge_method": "ties", "models": [{"model": "a", "parameters": {"weight": 0.5}}]}
    assert not is_search_space(plain) and not is_search_space(None)
    assert is_search_space({**plain, "models": [{"model": "a", "parameters": {"weight": {"range": [0, 1]}}}]})
    assert is_search_space({**plain, "merge_method": {"choice": ["ties", "linear"]}})
    assert is_search_space({"genome": {"models": ["a"]}, "tasks": ["t"]})
    assert is_search_space({**plain, "layer_groups": 2})  # a malformed space is still reported as one


def test_search_then_merge_then_submit_inside_one_budget(zoo, csvs, tmp_path, capsys):
    budget = 40
    out = tmp_path / "out"
    t0 = time.monotonic()
    code = main(["compete", str(space_file(zoo, tmp_path)), "--tasks", str(csvs / "test.csv"),
                 "--validation", str(csvs / "validation.csv"), "--budget", f"{budget}s", "--search-share", "0.4",
                 "--per-task", "6", "--population", "2", "--batch-size", "16", "--bootstrap", "0",
                 "--no-progress", "--out", str(out)])
    wall = time.monotonic() - t0
    printed = capsys.readouterr().out
    # 3: the evaluation of the hidden file was cut at the budget (a loaded machine); the outputs are written.
    assert code in (0, 3), printed
    written = json.loads((out / "compete.json").read_text())
    phases = {p["name"]: p for p in written["phases"]}
    assert [p["name"] for p in written["phases"]][:4] == ["load_tasks", "check_space", "search", "merge"]
    assert phases["search"]["status"] == DONE and phases["merge"]["status"] == DONE
    # The search kept to its share (its final steps included) and compete to the whole budget; the
    # margins are for this shared machine's noise, not for a phase that ignores its deadline.
    assert phases["search"]["seconds"] <= 0.4 * budget + 3
    assert written["used_s"] <= budget and wall <= budget + 10, printed
    search = written["search"]
    assert search["candidates"] >= 1 and search["best_fitness"] is not None and search["within_budget"]
    assert search["best_recipe"] == str(out / "search" / "best.yml") and "search: " in printed
    # The validation CSV mixes both kinds; only its multiple-choice rows score fitness, and that is said.
    assert any("generation items are left out" in n for n in written["notes"])
    records = [json.loads(line) for line in (out / "search" / "trace.jsonl").read_text().splitlines()]
    assert len(records) == search["candidates"]
    best = yaml.safe_load((out / "search" / "best.yml").read_text())
    assert best["merge_method"] == "ties" and all(isinstance(m["parameters"]["weight"], float)
                                                   for m in best["models"])
    # compete merges best.yml once, into OUT/model; the search writes no model of its own.
    assert (out / "model" / "config.json").is_file() and not (out / "search" / "model").exists()
    with open(csvs / "test.csv", newline="") as fh:
        ids = [r["id"] for r in csv.DictReader(fh)]
    with open(out / "submission.csv", newline="") as fh:
        assert [r["id"] for r in csv.DictReader(fh)] == ids


def test_every_problem_of_a_search_is_reported_before_any_work(zoo, csvs, tmp_path):
    space = space_file(zoo, tmp_path)
    with pytest.raises(InputError) as caught:
        compete(space, [csvs / "test.csv"], tmp_path / "out", budget="10m", search_share=1.5, progress=False)
    problems = "\n".join(caught.value.problems)
    assert "pass --validation FILES" in problems and "--search-share 1.5" in problems
    assert not (tmp_path / "out").exists()
    bad = yaml.safe_load(space.read_text())
    bad["models"][0]["parameters"]["density"] = {"range": [1, 0.5]}
    (tmp_path / "bad.yml").write_text(yaml.safe_dump(bad))
    with pytest.raises(InputError) as caught:
        compete(tmp_path / "bad.yml", [csvs / "test.csv"], tmp_path / "out", budget="10m",
                validation=[csvs / "validation.csv", tmp_path / "nope.csv"], search_share=0, progress=False)
    problems = "\n".join(caught.value.problems)
    assert "low must be below high" in problems and "nope.csv" in problems and "--search-share 0" in problems
    plain = tmp_path / "plain.yml"
    plain.write_text(yaml.safe_dump({"merge_method": "linear", "models": [{"model": str(zoo.base)}]}))
    with pytest.raises(InputError, match="plain recipe, not a search space"):
        compete(plain, [csvs / "test.csv"], tmp_path / "out", budget="10m", search_share=0.3, progress=False)


def test_the_cli_takes_search_flags_only_for_a_space(zoo, csvs, tmp_path, capsys):
    plain = tmp_path / "plain.yml"
    plain.write_text(yaml.safe_dump({"merge_method": "linear", "models": [{"model": str(zoo.base)}]}))
    code = main(["compete", str(plain), "--tasks", str(csvs / "test.csv"), "--out", str(tmp_path / "o"),
                 "--budget", "5m", "--workers", "2"])
    assert code == 2 and "plain recipe, not a search space" in capsys.readouterr().err
