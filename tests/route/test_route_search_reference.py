"""A routed folder as a search's reference model: evaluated in full beside the search, reported in
the summary, its answers calibrating the IRT fit, its problems reported with every other one."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from route_data import write_recipe

from mergesmith.cli import main
from mergesmith.errors import InputError
from mergesmith.evaluate import evaluate
from mergesmith.route.build import build_routed
from mergesmith.search.run import search


def _space(tmp_path, models, files):
    space = {"merge_method": "ties", "base_model": str(models["base"]), "dtype": "float32",
             "models": [{"model": str(models[s]), "parameters": {"weight": {"range": [0, 1]}, "density": 0.5}}
                        for s in "ab"],
             "tasks": [str(files["val_a"]), str(files["val_b"])]}
    path = tmp_path / "space.yml"
    path.write_text(yaml.safe_dump(space))
    return path


def test_a_routed_folder_is_a_search_reference(models, files, tmp_path):
    routed = tmp_path / "routed"
    build_routed(write_recipe(tmp_path / "route.yml", models, files, "centroid"), routed)
    space = _space(tmp_path, models, files)
    out = tmp_path / "search"
    result = search(space, out, budget_s=25, per_task=3, population=2, fitness="irt", irt_calibration=2,
                    irt_holdout_every=2, save_model=False, progress=False,
                    references=[str(routed), str(models["merged"])])
    refs = result.summary["references"]
    assert [r["model"] for r in refs] == [str(routed), str(models["merged"])]
    alone = evaluate(routed, [files["val_a"], files["val_b"]], bootstrap=0, progress=False)
    assert refs[0]["validation"]["macro"] == pytest.approx(alone.macro)
    assert refs[0]["validation"]["complete"] and refs[0]["routed"]["share_by_task"]
    assert "routed" not in refs[1] and "answers" not in refs[0]  # the per-item answers stay out of the summary
    # the two references, the base and the two experts, then the calibration candidates
    assert result.summary["irt"]["fitted_on_models"] == 2 + 3 + 2
    predictions = (out / "references" / "0" / "validation" / "predictions.jsonl").read_text().splitlines()
    assert {json.loads(line)["expert"] for line in predictions} <= {"a", "b"}
    # a resume with the same references reuses their evaluations; other references are refused
    before = (out / "references.json").stat().st_mtime_ns
    again = search(space, out, budget_s=8, per_task=3, population=2, fitness="irt", irt_calibration=2,
                   irt_holdout_every=2, save_model=False, progress=False, resume=True,
                   references=[str(routed), str(models["merged"])])
    assert (out / "references.json").stat().st_mtime_ns == before
    assert again.summary["references"][0]["validation"] == refs[0]["validation"]
    with pytest.raises(InputError, match="references"):
        search(space, out, budget_s=20, per_task=3, save_model=False, progress=False, resume=True,
               fitness="irt", references=[str(routed)])


def test_reference_problems_are_reported_with_the_others(models, files, tmp_path, capsys):
    routed = tmp_path / "routed"
    build_routed(write_recipe(tmp_path / "route.yml", models, files, "centroid"), routed)
    changed = tmp_path / "expert_b"
    shutil.copytree(models["b"], changed)
    moved = write_recipe(tmp_path / "moved.yml", {**models, "b": changed}, files, "centroid")
    build_routed(moved, tmp_path / "stale")
    config = json.loads((changed / "config.json").read_text())
    (changed / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-3}))
    space = _space(tmp_path, models, files)
    code = main(["search", str(space), "--out", str(tmp_path / "s"), "--budget", "1m", "--per-task", "0",
                 "--reference", str(tmp_path / "stale"), "--reference", str(tmp_path / "nowhere"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert "--per-task 0 must be at least 1" in err and "expert 'b'" in err and "config.json changed" in err
    assert f"--reference {tmp_path / 'nowhere'}: " in err
    assert not (tmp_path / "s").exists()  # nothing ran


def test_the_cli_prints_each_reference_beside_the_best_recipe(models, files, tmp_path, capsys):
    routed = tmp_path / "routed"
    build_routed(write_recipe(tmp_path / "route.yml", models, files, "classifier"), routed)
    code = main(["search", str(_space(tmp_path, models, files)), "--out", str(tmp_path / "s"), "--budget", "15s",
                 "--per-task", "3", "--no-model", "--no-progress", "--reference", str(routed)])
    out = capsys.readouterr().out
    assert code == 0
    line = next(l for l in out.splitlines() if l.startswith(f"reference {routed}:"))
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert f"{summary['references'][0]['validation']['macro']:.4f}" in line and "best recipe" in line
