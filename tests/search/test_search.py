"""The budgeted search loop in-process: outputs, budget, resume, optimizers, CLI (tiny models)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

import mergesmith
from mergesmith.cli import main
from mergesmith.errors import InputError
from mergesmith.search import search
from mergesmith.search.fitness import stratified_subsample, weighted_fitness
from mergesmith.search.optimizers import load_optimizer
from mergesmith.search.run import pareto_front


def _trace(out):
    return [json.loads(line) for line in (out / "trace.jsonl").read_text().splitlines()]


def test_search_writes_best_recipe_trace_plots_and_final_evaluation(search_world, tmp_path):
    space, _, test = search_world
    out = tmp_path / "run"
    result = search(space, out, budget_s="12s", per_task=8, population=3, test_tasks=[str(test)], progress=False)
    records = _trace(out)
    assert result.candidates == len(records) >= 3
    assert [r["index"] for r in records] == list(range(len(records)))
    for r in records:
        assert set(r) >= {"params", "u", "fitness", "scores", "merge_s", "eval_s", "t", "generation"}
        # The space weights val_b twice: fitness = (a + 2 b) / 3.
        assert r["fitness"] == pytest.approx((r["scores"]["val_a"] + 2 * r["scores"]["val_b"]) / 3)
    best = max(records, key=lambda r: r["fitness"])
    assert result.best["fitness"] == best["fitness"]
    # best.yml is an ordinary recipe: mergesmith merge runs it, and the model written equals OUT/model.
    recipe = yaml.safe_load((out / "best.yml").read_text())
    assert recipe["models"][0]["parameters"] == {"weight": pytest.approx(best["params"]["ft0.weight"]),
                                                 "density": pytest.approx(best["params"]["ft0.density"])}
    mergesmith.merge(out / "best.yml", tmp_path / "again", progress=False)
    from safetensors.torch import load_file

    shard = "model-00001-of-00001.safetensors"
    again, saved = load_file(tmp_path / "again" / shard), load_file(out / "model" / shard)
    assert all(torch.equal(again[k], saved[k]) for k in again)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["within_budget"] and summary["seconds"] <= 12
    assert summary["final"]["validation"]["complete"] and set(summary["final"]["test"]["scores"]) == {"test_a"}
    assert (out / "final" / "validation" / "results.json").is_file() and (out / "fitness.png").is_file()
    assert 0 <= summary["throughput"]["merge_share"] <= 1


def test_the_budget_holds_and_the_best_so_far_is_kept(search_world, tmp_path):
    space, _, _ = search_world
    out = tmp_path / "short"
    result = search(space, out, budget_s=5, per_task=8, population=500, progress=False)
    # A generation of 500 cannot finish: the search stops inside the budget, untold, with the best so far.
    assert result.seconds <= 5
    assert result.summary["stop_reason"] == "budget"
    assert not (out / "optimizer.json").exists()
    assert result.best is not None and (out / "best.yml").is_file()


def test_resume_continues_the_trace_and_the_optimizer(search_world, tmp_path):
    space, _, _ = search_world
    out = tmp_path / "resumed"
    search(space, out, budget_s=6, per_task=6, population=2, save_model=False, progress=False)
    first = _trace(out)
    generation = load_optimizer(out / "optimizer.json").generation
    assert generation >= 1
    with pytest.raises(InputError, match="already holds a search"):
        search(space, out, budget_s=6, per_task=6, population=2, progress=False)
    with pytest.raises(InputError, match="seed"):
        search(space, out, budget_s=6, per_task=6, population=2, seed=1, resume=True, progress=False)
    with (out / "trace.jsonl").open("a") as f:
        f.write('{"index": 99, "fitn')  # a line cut by a killed run
    result = search(space, out, budget_s=6, per_task=6, population=2, save_model=False, resume=True,
                    progress=False)
    records = _trace(out)
    assert records[: len(first)] == first
    assert [r["index"] for r in records] == list(range(len(records))) and len(records) > len(first)
    resumed = records[len(first):]
    assert resumed[0]["generation"] >= generation and resumed[0]["t"] >= first[-1]["t"]
    assert result.candidates == len(records)


def test_nsga2_returns_a_pareto_front_and_random_search_runs(search_world, tmp_path):
    space, _, _ = search_world
    result = search(space, tmp_path / "moo", budget_s=8, per_task=6, population=4, optimizer="nsga2",
                    save_model=False, progress=False)
    front = set(result.summary["pareto"])
    records = _trace(tmp_path / "moo")
    assert front and all(r["objectives"] == [r["scores"]["val_a"], r["scores"]["val_b"]] for r in records)
    assert (tmp_path / "moo" / "pareto.png").is_file()
    # Its state is JSON (optuna 5.1's sampler no longer pickles), and a resume replays it.
    told = load_optimizer(tmp_path / "moo" / "optimizer.json").generation
    assert told >= 1
    resumed = search(space, tmp_path / "moo", budget_s=5, per_task=6, population=4, optimizer="nsga2",
                     save_model=False, resume=True, progress=False)
    assert resumed.candidates > len(records) and _trace(tmp_path / "moo")[len(records)]["generation"] == told
    assert search(space, tmp_path / "rnd", budget_s=5, per_task=6, optimizer="random", save_model=False,
                  progress=False).candidates >= 1


def test_pareto_front_by_hand():
    def rec(i, a, b):
        return {"index": i, "status": "ok", "scores": {"a": a, "b": b}}

    records = [rec(0, 0.5, 0.5), rec(1, 0.6, 0.4), rec(2, 0.4, 0.4), rec(3, 0.5, 0.5), rec(4, 0.2, 0.9)]
    assert [r["index"] for r in pareto_front(records)] == [0, 1, 3, 4]  # 2 is beaten by 0; ties stay


def test_stratified_subsample_by_hand():
    from mergesmith.evaluate.tasks import Item, Task

    answers = [0, 0, 0, 0, 0, 0, 1, 1, 2]
    task = Task("t", "multiple_choice", [Item(str(i), "multiple_choice", "p", ("x", "y", "z"), a, position=i)
                                         for i, a in enumerate(answers)])
    (sub,) = stratified_subsample([task], 3, seed=0)
    assert sorted(i.answer for i in sub.items) == [0, 1, 2]  # every answer position drawn
    assert [i.position for i in sub.items] == sorted(i.position for i in sub.items)  # file order kept
    assert [i.id for i in stratified_subsample([task], 3, seed=0)[0].items] == [i.id for i in sub.items]
    assert stratified_subsample([task], 20)[0] is task
    assert weighted_fitness({"a": 0.5, "b": 1.0}, {"a": 1, "b": 3}) == pytest.approx(0.875)


def test_cli_search_and_its_errors(search_world, tmp_path, capsys, monkeypatch):
    space, val, _ = search_world
    out = tmp_path / "cli"
    assert main(["search", str(space), "--tasks", *map(str, val), "--budget", "8s", "--out", str(out),
                 "--per-task", "6", "--population", "3", "--no-model", "--no-progress"]) == 0
    assert "best fitness" in capsys.readouterr().out and (out / "best.yml").is_file()
    assert main(["search", str(space), "--budget", "soon", "--workers", "0", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "--budget 'soon' is not a duration" in err and "--workers 0 must be at least 1" in err
    # Without Ray, more than one worker names the extra to install.
    import mergesmith.extras as extras

    real = extras.find_spec
    monkeypatch.setattr(extras, "find_spec", lambda name: None if name == "ray" else real(name))
    assert main(["search", str(space), "--workers", "2", "--out", str(tmp_path / "noray")]) == 2
    assert "pip install 'mergesmith[search]'" in capsys.readouterr().err
