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
