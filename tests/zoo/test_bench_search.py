"""benchmarks/bench_search.py at test size with tiny budgets: every part runs and reports (a smoke test; the
figures themselves come from the default zoo, run by hand)."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_search.py"


def load_script():
    spec = importlib.util.spec_from_file_location("bench_search_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_every_part_runs_at_test_size(zoo, zoo_cache, tmp_path, capsys):
    workers = [1, 2] if importlib.util.find_spec("ray") else [1]
    report = load_script().main(["--size", "test", "--cache", str(zoo_cache), "--out", str(tmp_path / "out"),
                                 "--budget", "6s", "--short-budget", "6s", "--seeds", "0", "1", "--workers", "1",
                                 "--throughput-workers", *map(str, workers), "--per-task", "4", "--quiet"])
    printed = capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "report.json").read_text()) == json.loads(json.dumps(report))
    grid = report["grid"]
    # bench's own selection chose a point of its TIES grid, and both recipes were scored on the test split
    assert grid["grid"]["chosen"]["lambda"] in (0.7, 1.0, 1.5, 2.0) and 0 <= grid["grid"]["avg_trained"] <= 1
    assert [r["seed"] for r in grid["searches"]] == [0, 1]
    assert all(r["candidates"] >= 1 and 0 <= r["avg_heldout"] <= 1 for r in grid["searches"])
    assert set(grid["avg_trained"]) >= {"search_mean", "search_std", "grid", "exceeds_seed_spread"}
    assert [g["seed"] for g in report["gap"]] == [0, 1] and report["gap"][0]["fitness_minus_test"] is not None
    assert [r["workers"] for r in report["throughput"]] == workers
    # (Ray's start may eat a 6 s budget: the 2-worker row may hold no candidate, but no error)
    assert all("error" not in r for r in report["throughput"]) and report["throughput"][0]["candidates"] >= 1
    assert "candidates" in report["irt"]
    members = report["selection"]["members"]
    assert len(members) == len(zoo.pool) and {m["kind"] for m in members} == {"expert", "lora", "distractor"}
    assert any(m["kept"] for m in members)
    for heading in ("1. searched", "2. validation", "3. throughput", "4. IRT", "5. model selection"):
        assert heading in printed


def test_rerank_pairs_the_fitness_pick_with_the_reranked_pick_on_test(tmp_path, capsys):
    """Where the rerank changed the pick, the by-fitness candidate's recipe (its trace's parameters in the
    space) is scored on test too; where it did not, the reranked pick's scores stand for both."""
    import argparse

    import yaml

    script = load_script()
    space = {"merge_method": "ties", "base_model": "/zoo/base", "dtype": "float32",
             "models": [{"model": "/zoo/ft0", "parameters": {"weight": {"range": [0, 1]}, "density": 0.5}}]}
    (tmp_path / "grid-seed0-rerank2.space.yml").write_text(yaml.safe_dump(space))
    (tmp_path / "grid-seed0-rerank2").mkdir()
    (tmp_path / "grid-seed0-rerank2" / "trace.jsonl").write_text(
        "".join(json.dumps({"index": i, "params": {"ft0.weight": w}}) + "\n" for i, w in enumerate([0.25, 0.75])))

    class FakeBench:
        args = argparse.Namespace(out=tmp_path)
        candidate_recipe = script.Bench.candidate_recipe
        scored: list = []

        def test_scores(self, recipe):
            self.scored.append(recipe)
            return {"weight": recipe["models"][0]["parameters"]["weight"]}

        def averages(self, scores):
            return {"avg_trained": scores["weight"], "avg_heldout": 1 - scores["weight"]}

    block = {"k": 2, "chosen": 0, "by_fitness": 1,
             "candidates": [{"index": 1, "fitness": 0.9, "full_validation": 0.5},
                            {"index": 0, "fitness": 0.8, "full_validation": 0.6}]}
    b = FakeBench()
    pair = script.rerank_pair(b, "grid-seed0-rerank2", block, {"avg_trained": 0.3, "avg_heldout": 0.4})
    assert [r["models"][0]["parameters"] for r in b.scored] == [{"weight": 0.75, "density": 0.5}]
    assert pair["by_fitness"] == {"index": 1, "fitness": 0.9, "full_validation": 0.5, "avg_trained": 0.75,
                                  "avg_heldout": 0.25}
    assert pair["chosen"] == {"index": 0, "fitness": 0.8, "full_validation": 0.6, "avg_trained": 0.3,
                              "avg_heldout": 0.4}
    assert pair["reranked_candidates"] == 2 and pair["note"] is None
    same = script.rerank_pair(b, "grid-seed0-rerank2", {**block, "chosen": 1}, {"avg_trained": 0.3,
                                                                                "avg_heldout": 0.4})
    assert len(b.scored) == 1 and same["by_fitness"]["avg_trained"] == same["chosen"]["avg_trained"] == 0.3
    script.print_report({"grid": {"grid": {"chosen": {}, "avg_trained": 0.5, "avg_heldout": 0.5},
                                  "searches": [{"seed": 0, "candidates": 2, "rerank": pair}]}})
    printed = capsys.readouterr().out
    assert "1b. rerank" in printed and "avg_trained (rr)" in printed



def test_the_bench_takes_a_rerank_k_off_by_default(tmp_path):
    script = load_script()
    assert script.parse_args(["--out", str(tmp_path), "--rerank", "8"]).rerank == 8
    assert script.parse_args(["--out", str(tmp_path)]).rerank == 0
