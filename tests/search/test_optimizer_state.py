"""Optimizer state as JSON: a resumed optimizer asks exactly what the uninterrupted one asks;
a library that proposes differently is warned of and still continues; old pickles are refused."""

from __future__ import annotations

import json
import math
import pickle

import numpy as np
import pytest

from mergesmith.errors import InputError
from mergesmith.search import search
from mergesmith.search.optimizers import OPTIMIZERS, load_optimizer, make_optimizer, save_optimizer

GENERATIONS = 7
STOPS = (2, 5)  # a run stopped after 2 generations, resumed, stopped after 5, resumed again


def _objectives(u: np.ndarray) -> list[float]:
    """Two deterministic objectives with different optima (the single-objective optimizers read the first)."""
    return [-float(np.sum((u - 0.3) ** 2)), math.sin(3 * float(u.sum()))]


def _generation(optimizer) -> list[np.ndarray]:
    us = optimizer.ask()
    optimizer.tell(us, [_objectives(u) for u in us])
    return us


def _make(name: str, dim: int, seed: int = 3):
    return make_optimizer(name, dim, seed=seed, batch=5, n_objectives=2)


def _disturb_the_process(name: str, dim: int) -> None:
    """What a fresh process, or other work in this one, may do between the save and the load: move numpy's
    global generator, and run another optimizer of the same kind with another seed."""
    np.random.seed(12345)
    np.random.random(17)
    _generation(_make(name, dim, seed=99))


@pytest.mark.parametrize("dim", [1, 4])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_resumed_optimizer_asks_exactly_what_the_uninterrupted_one_asks(name, dim, tmp_path):
    uninterrupted = _make(name, dim)
    expected = [_generation(uninterrupted) for _ in range(GENERATIONS)]

    optimizer = _make(name, dim)
    asked = []
    path = tmp_path / "optimizer.json"
    for generation in range(GENERATIONS):
        if generation in STOPS:
            save_optimizer(optimizer, path)
            del optimizer
            _disturb_the_process(name, dim)
            optimizer = load_optimizer(path)  # from the JSON file alone
            assert optimizer.generation == generation
        asked.append(_generation(optimizer))
    assert len(asked) == len(expected)
    for got, want in zip(asked, expected):
        assert len(got) == len(want) and all(np.array_equal(a, b) for a, b in zip(got, want))
    assert all(((u >= 0) & (u <= 1)).all() for us in asked for u in us)


def test_what_each_saved_state_holds(tmp_path):
    held = {}
    for name in OPTIMIZERS:
        optimizer = _make(name, 3)
        for _ in range(2):
            _generation(optimizer)
        save_optimizer(optimizer, tmp_path / f"{name}.json")
        held[name] = json.loads((tmp_path / f"{name}.json").read_text())  # plain JSON, no pickle inside
    assert held["random"]["rng"]["bit_generator"] == "PCG64" and held["random"]["generation"] == 2
    assert {"dim", "seed", "batch", "x0", "sigma0", "cma_version", "told", "rng"} <= set(held["cma"])
    assert {"dim", "n_objectives", "seed", "batch", "optuna_version", "told"} <= set(held["nsga2"])
    for name, key in (("cma", "candidates"), ("nsga2", "params")):
        assert len(held[name]["told"]) == 2 and len(held[name]["told"][0][key]) == 5
    assert all(state["format"] == "mergesmith search state" for state in held.values())


@pytest.mark.parametrize("name, key", [("cma", "candidates"), ("nsga2", "params")])
def test_a_library_that_proposes_differently_is_warned_of_and_the_run_continues(name, key, tmp_path):
    optimizer = _make(name, 3)
    for _ in range(3):
        _generation(optimizer)
    path = tmp_path / "optimizer.json"
    save_optimizer(optimizer, path)
    # What another library version would have proposed in generation 1: other candidates.
    state = json.loads(path.read_text())
    state["told"][1][key] = [[0.5 * x + 0.1 for x in vector] for vector in state["told"][1][key]]
    path.write_text(json.dumps(state))

    with pytest.warns(RuntimeWarning, match="from generation 1 on.*will not be the sequence an uninterrupted run"):
        resumed = load_optimizer(path)
    # The stored generations and their fitness are kept as they were told.
    assert resumed.generation == 3 and resumed.told == state["told"]
    for _ in range(2):
        us = _generation(resumed)
        assert len(us) == 5 and all(((u >= 0) & (u <= 1)).all() for u in us)
    if name == "nsga2":
        # ... as NSGA-II's own population: the trials after them are its generations 3 and 4, not a fresh start.
        study = resumed.study
        params = [[t.params[f"u{i}"] for i in range(3)] for t in study.trials[:15]]
        assert params == [p for told in state["told"] for p in told["params"]]
        assert [study.sampler.get_trial_generation(study, t) for t in study.trials[15:]] == [3] * 5 + [4] * 5
    save_optimizer(resumed, path)  # and it saves again


def test_resuming_a_search_that_left_an_optimizer_pickle_says_to_start_a_new_out(search_world, tmp_path):
    space, _, _ = search_world
    out = tmp_path / "old"
    out.mkdir()
    (out / "trace.jsonl").write_text("")
    (out / "optimizer.pkl").write_bytes(pickle.dumps({"never": "unpickled"}))
    with pytest.raises(InputError, match=r"optimizer\.pkl.*older mergesmith.*start a new --out"):
        search(space, out, budget_s=5, per_task=6, resume=True, progress=False)
