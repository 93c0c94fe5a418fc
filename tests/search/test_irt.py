"""The IRT estimator: an exact hand case, better than the anchors alone on simulated answers, a JSON round
trip that estimates bit for bit the same, in a search and its resume."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mergesmith.search import search
from mergesmith.search.irt import IRTFitness, ItemBank, fit_items


def test_estimate_by_hand():
    # a = 0: every model has P(correct_i) = sigmoid(-b_i), whatever its ability.
    keys = [("x", 0), ("x", 1), ("x", 2), ("y", 0)]
    bank = ItemBank(keys, torch.zeros(4, 2, dtype=torch.float64),
                    torch.tensor([0.0, math.log(3), -math.log(3), 0.0], dtype=torch.float64))
    est = bank.estimate({("x", 0): 1.0})
    # task x: anchor (x, 0) answered right, (x, 1) at sigmoid(-ln 3) = 1/4, (x, 2) at 3/4.
    assert est["x"] == pytest.approx((1 + 0.25 + 0.75) / 3)
    assert est["y"] == pytest.approx(0.5)


def test_irt_beats_the_anchor_items_alone_on_simulated_models():
    rng = np.random.default_rng(0)
    n, dim = 240, 2
    a = np.abs(rng.normal(1.0, 0.5, (n, dim)))
    b = rng.normal(0.0, 1.5, n)
    keys = [(f"t{i % 3}", i) for i in range(n)]

    def answers():
        p = 1 / (1 + np.exp(-(a @ rng.normal(0, 1, dim) - b)))
        return (rng.random(n) < p).astype(float)

    bank = fit_items(keys, [dict(zip(keys, answers())) for _ in range(12)], steps=200)
    anchors = rng.choice(n, 30, replace=False)
    irt_err, raw_err = [], []
    for _ in range(20):
        y = answers()
        truth = {t: y[[i for i in range(n) if keys[i][0] == t]].mean() for t in ("t0", "t1", "t2")}
        est = bank.estimate({keys[i]: y[i] for i in anchors})
        for t, value in truth.items():
            raw = y[[i for i in anchors if keys[i][0] == t]].mean()
            irt_err.append(abs(est[t] - value))
            raw_err.append(abs(raw - value))
    assert np.mean(irt_err) < 0.8 * np.mean(raw_err)


def test_a_reloaded_irt_fitness_estimates_bit_for_bit_the_same():
    rng = np.random.default_rng(0)
    tasks = {"a": 30, "b": 20}
    keys = [(task, i) for task, n in tasks.items() for i in range(n)]
    anchors = {k for k in keys if k[1] % 4 == 0}

    def result(full: bool) -> dict:
        p = rng.random()
        answers = {task: [[i, float(rng.random() < p)] for i in range(n) if full or (task, i) in anchors]
                   for task, n in tasks.items()}
        scores = {task: float(np.mean([v for _, v in rows])) for task, rows in answers.items()}
        return {"answers": answers, "scores": scores, "full": full, "eval_s": float(rng.random())}

    irt = IRTFitness(keys, anchors, {"a": 1.0, "b": 2.0}, calibration=3, holdout_every=2)
    for _ in range(4):
        irt.add_reference(result(True))
    for index in range(8):
        irt.score(result(irt.wants_full(index)))
    assert irt.bank is not None and irt.pairs

    reloaded = IRTFitness.from_state(json.loads(json.dumps(irt.state())))
    assert torch.equal(reloaded.bank.a, irt.bank.a) and torch.equal(reloaded.bank.b, irt.bank.b)
    assert reloaded.report() == irt.report() and reloaded.responses == irt.responses
    for _ in range(3):
        answers = result(False)
        anchor = {(task, pos): v for task, rows in answers["answers"].items() for pos, v in rows}
        assert reloaded.bank.estimate(anchor) == irt.bank.estimate(anchor)  # exact, not approximate
        for full in (False, True):
            answers["full"] = full
            assert reloaded.score(dict(answers)) == irt.score(dict(answers))
    assert reloaded.state() == irt.state()


def test_search_with_irt_fitness_reports_its_error(search_world, tmp_path):
    space, _, _ = search_world
    out = tmp_path / "irt"
    result = search(space, out, budget_s=14, per_task=6, population=3, fitness="irt", irt_calibration=2,
                    irt_holdout_every=2, save_model=False, progress=False)
    records = [json.loads(line) for line in (out / "trace.jsonl").read_text().splitlines()]
    report = result.summary["irt"]
    assert report["fitted"] and report["fitted_on_models"] == 4 + 2  # base, 3 fine-tunes, 2 candidates
    assert records[0]["full"] is not None and records[0]["estimated"] is None  # calibration: full only
    held = [r for r in records if r["full"] is not None and r["estimated"] is not None]
    assert len(held) == report["held_back"] >= 1
    assert report["mae"] == pytest.approx(np.mean([abs(r["estimated"] - r["full"]) for r in held]))
    assert all(r["fitness"] == r["full"] for r in held)
    estimated_only = [r for r in records if r["full"] is None]
    assert all(r["fitness"] == pytest.approx(r["estimated"]) for r in estimated_only)
    # A resume reads irt.json: the items stay fitted on the same models, and the held-back pairs go on.
    resumed = search(space, out, budget_s=6, per_task=6, population=3, fitness="irt", irt_calibration=2,
                     irt_holdout_every=2, save_model=False, resume=True, progress=False)
    again = resumed.summary["irt"]
    assert again["fitted_on_models"] == report["fitted_on_models"] and again["held_back"] >= report["held_back"]
    assert json.loads((out / "irt.json").read_text())["bank"] is not None
