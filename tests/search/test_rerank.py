"""``--rerank K``: the top K candidates by fitness re-ranked on the full validation tasks at the end."""

from __future__ import annotations

import json
import time

import pytest
import yaml

from mergesmith.cli import main
from mergesmith.search import search
from mergesmith.search.run import SearchOptions, _rerank, _top_candidates, search_problems
from mergesmith.search.space import load_space


class FullScoresPool:
    """A pool whose full evaluations return fixed per-task scores by candidate (no model runs);
    ``late`` results (the loop's last candidates, still in flight) come back first."""

    def __init__(self, full_scores: dict[int, dict[str, float]], workers: int = 2, late: tuple[int, ...] = ()):
        self.full_scores = full_scores
        self.size = workers
        self.running: list[dict] = [{"index": i, "status": "ok", "scores": {}, "full": False} for i in late]
        self.submitted: list[int] = []

    def free(self) -> int:
        return self.size - len(self.running)

    def submit(self, index: int, recipe: dict, full: bool = False) -> None:
        assert full and index < 0  # rerank ids are negative: never a loop candidate's
        candidate = -1 - index
        self.submitted.append(candidate)
        self.running.append({"index": index, "status": "ok", "scores": self.full_scores[candidate], "full": True})

    def in_flight(self) -> int:
        return len(self.running)

    def wait(self, timeout):
        return self.running.pop(0) if self.running else None


def _records(fitnesses: list[float], params: list[float] = None) -> list[dict]:
    params = params or [i / 10 for i in range(len(fitnesses))]
    return [{"index": i, "status": "ok", "fitness": f, "params": {"ft0.weight": p, "ft0.density": 0.5,
                                                                   "ft1.weight": 0.5, "ft1.density": 0.5,
                                                                   "ft2.weight": 0.5, "ft2.density": 0.5},
             "scores": {}, "merge_s": 0.01, "eval_s": 0.01, "items": 10}
            for i, (f, p) in enumerate(zip(fitnesses, params))]


def test_top_candidates_skip_repeated_parameters_and_break_ties_by_index():
    records = _records([0.5, 0.9, 0.9, 0.7, 0.9], params=[0.1, 0.2, 0.3, 0.4, 0.2])
    records.append({**records[0], "index": 5, "status": "invalid", "fitness": 0.0})
    # 4 repeats 1's parameters; 1 and 2 tie on fitness and 1 comes first.
    assert [r["index"] for r in _top_candidates(records, 3)] == [1, 2, 3]
    assert [r["index"] for r in _top_candidates(records, 100)] == [1, 2, 3, 0]


def test_rerank_chooses_the_best_full_validation_among_the_top_k(search_world):
    space_path, _, _ = search_world
    space = load_space(space_path)
    records = _records([0.80, 0.95, 0.60, 0.90, 0.85])
    weights = {"a": 1.0, "b": 2.0}
    # Full validation, weighted (a + 2 b) / 3: 1 -> 0.60, 3 -> (0.9 + 1.4) / 3 = 0.7667, 4 -> 0.70.
    full = {1: {"a": 0.6, "b": 0.6}, 3: {"a": 0.9, "b": 0.7}, 4: {"a": 0.7, "b": 0.7}}
    pool = FullScoresPool(full, late=(1, 3))  # two loop results with ids that collide with candidates'
    chosen, block = _rerank(space, records, [], weights, 3, pool, time.monotonic() + 60, lambda text: None)
    assert sorted(pool.submitted) == [1, 3, 4]
    assert chosen["index"] == 3 and block["chosen"] == 3 and block["by_fitness"] == 1 and block["k"] == 3
    assert block["candidates"] == [{"index": 1, "fitness": 0.95, "full_validation": pytest.approx(0.6)},
                                   {"index": 3, "fitness": 0.90, "full_validation": pytest.approx(2.3 / 3)},
                                   {"index": 4, "fitness": 0.85, "full_validation": pytest.approx(0.7)}]
    assert "note" not in block


def test_rerank_ties_fall_to_the_fitness_then_a_k_above_the_candidates_takes_them_all(search_world):
    space = load_space(search_world[0])
    records = _records([0.7, 0.8, 0.6])
    same = {"a": 0.5}
    pool = FullScoresPool({0: same, 1: same, 2: {"a": 0.4}}, workers=1)
    chosen, block = _rerank(space, records, [], {"a": 1.0}, 10, pool, time.monotonic() + 60, lambda text: None)
    assert block["k"] == 10 and [c["index"] for c in block["candidates"]] == [1, 0, 2]
    assert chosen["index"] == 1 == block["by_fitness"]  # 0 and 1 tie in full; 1 has the higher fitness


def test_rerank_past_its_deadline_keeps_the_fitness_pick_and_says_so(search_world):
    space = load_space(search_world[0])
    records = _records([0.7, 0.8])
    pool = FullScoresPool({0: {"a": 0.9}, 1: {"a": 0.1}})
    chosen, block = _rerank(space, records, [], {"a": 1.0}, 2, pool, time.monotonic() - 1, lambda text: None)
    assert pool.submitted == [] and chosen["index"] == 1 == block["chosen"]
    assert "0 of 2 full evaluations" in block["note"]
    assert all(c["full_validation"] is None for c in block["candidates"])


def test_rerank_takes_the_irt_full_scores_it_already_has(search_world):
    space = load_space(search_world[0])
    records = _records([0.7, 0.8])
    records[0]["full"], records[1]["full"] = 0.9, None
    pool = FullScoresPool({1: {"a": 0.5}})
    chosen, block = _rerank(space, records, [], {"a": 1.0}, 2, pool, time.monotonic() + 60, lambda text: None)
    assert pool.submitted == [1] and chosen["index"] == 0


def test_search_with_rerank_writes_the_chosen_recipe_and_the_summary_block(search_world, tmp_path):
    space, _, _ = search_world
    out = tmp_path / "rerank"
    result = search(space, out, budget_s=12, per_task=4, population=3, rerank=3, save_model=False,
                    progress=False)
    records = [json.loads(line) for line in (out / "trace.jsonl").read_text().splitlines()]
    block = result.summary["rerank"]
    assert result.summary["within_budget"]
    by_fitness = max(records, key=lambda r: (r["fitness"], -r["index"]))
    assert block["k"] == 3 and block["by_fitness"] == by_fitness["index"]
    distinct = {json.dumps(r["params"], sort_keys=True) for r in records if r["status"] == "ok"}
    assert len(block["candidates"]) == min(3, len(distinct))
    scored = [c for c in block["candidates"] if c["full_validation"] is not None]
    assert scored and block["chosen"] == max(scored, key=lambda c: (c["full_validation"], c["fitness"],
                                                                     -c["index"]))["index"]
    chosen = records[block["chosen"]]
    assert result.best["index"] == chosen["index"] == result.summary["best"]["index"]
    recipe = yaml.safe_load((out / "best.yml").read_text())
    assert recipe["models"][0]["parameters"]["weight"] == pytest.approx(chosen["params"]["ft0.weight"])
    # The final evaluation is the chosen recipe's: its full validation, weighted, is the rerank's figure.
    final = result.summary["final"]["validation"]
    assert final["weighted"] == pytest.approx(next(c for c in scored if c["index"] == chosen["index"])
                                              ["full_validation"])


def test_rerank_zero_is_off_and_a_negative_k_is_refused(search_world, tmp_path, capsys):
    space, _, _ = search_world
    assert SearchOptions().rerank == 0
    result = search(space, tmp_path / "off", budget_s=3, per_task=4, population=2, save_model=False,
                    progress=False)
    assert "rerank" not in result.summary
    assert any("--rerank -1 must be a whole number, at least 0" in p
               for p in search_problems(space, SearchOptions(rerank=-1)))
    assert main(["search", str(space), "--rerank", "-2", "--workers", "0", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "--rerank -2 must be a whole number, at least 0" in err and "--workers 0 must be at least 1" in err
    assert not (tmp_path / "bad").exists()
    # compete passes --rerank to its search and checks it with compete's own problems, before any work.
    space_dir, val = tmp_path / "compete", search_world[1]
    assert main(["compete", str(space), "--tasks", str(val[0]), "--validation", str(val[0]), "--rerank", "-1",
                 "--search-share", "2", "--budget", "5m", "--out", str(space_dir)]) == 2
    err = capsys.readouterr().err
    assert "--rerank -1 must be a whole number, at least 0" in err and "--search-share 2" in err
    assert not space_dir.exists()
