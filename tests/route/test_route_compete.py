"""compete with a routing recipe: the routed model is built in the merge's place, routing and every
expert load happen inside the evaluate phase and are reported."""

from __future__ import annotations

import csv
import json

import pytest

from route_data import write_hidden_csv, write_recipe

from mergesmith.cli import main
from mergesmith.errors import InputError
from mergesmith.evaluate.compete import compete


@pytest.fixture
def hidden(tmp_path):
    """Two competition-style test files: prompts without answers."""
    return [write_hidden_csv(tmp_path / "hidden" / f"hidden_{s}.csv", s) for s in "ab"]


def test_compete_builds_and_evaluates_a_routed_model(models, files, hidden, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "route.yml", models, files, "centroid")
    result = compete(recipe, [*hidden, files["val_a"]], tmp_path / "run", budget="10m", progress=False,
                     isolate_merge=False)
    assert [p.name for p in result.phases] == ["load_tasks", "check_recipe", "route", "evaluate", "write"]
    assert result.complete
    assert result.routed["model_loads"] == 3 and result.routed["kind"] == "centroid"
    saved = json.loads((tmp_path / "run" / "compete.json").read_text())
    assert saved["routed"]["share_by_task"]["a"] == {"a": 1.0}
    assert "routed (centroid), inside the evaluate phase" in result.summary()
    rows = list(csv.reader(open(tmp_path / "run" / "submission-hidden_a.csv", newline="")))
    assert rows[0] == ["id", "prediction", "dummy_field"] and len(rows) == 5
    assert (tmp_path / "run" / "model" / "routed.json").is_file()


def test_compete_checks_the_routing_recipe_with_everything_else(models, files, hidden, tmp_path):
    recipe = write_recipe(tmp_path / "route.yml", {**models, "a": tmp_path / "gone"}, files, "classifier")
    with pytest.raises(InputError) as err:
        compete(recipe, [tmp_path / "missing.jsonl"], tmp_path / "run", budget="10m", progress=False,
                adamerge=object(), validation=[files["val_a"]])
    text = str(err.value)
    assert "gone: a routed model names local folders" in text
    assert "--adamerge and the search options do not apply" in text
    assert "missing.jsonl" in text
    assert "--validation does not apply to a routing recipe" in text
    assert not (tmp_path / "run" / "model").exists()


def test_compete_cli_with_a_routing_recipe_in_a_child_process(models, files, hidden, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "route.yml", models, files, "oracle")
    assert main(["compete", str(recipe), "--tasks", str(files["val_a"]), str(files["val_b"]), "--budget", "10m",
                 "--out", str(tmp_path / "run"), "--no-progress", "--bootstrap", "0"]) == 0
    out = capsys.readouterr().out
    assert "route" in out and "routed (oracle)" in out
