"""The benchmark's data-aware and learned rows: end to end at test size, their data, their cache."""

import csv
import json

import pytest

from mergesmith.zoo import bench as BN
from mergesmith.zoo import bench_learned as BL

DATA_AWARE = ("regmean", "regmean_plusplus", "fisher", "adamerging", "dam")


@pytest.fixture(scope="module")
def learned_bench(zoo, zoo_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-learned")
    cfg = BN.BenchConfig(out=out, size="test", seeds=(0,), methods=DATA_AWARE, cache=zoo_cache, limit=4,
                         val_limit=4, generation=False, progress=False)
    lines = []
    BN.run_bench(cfg, log=lines.append)
    return cfg, lines


def test_the_rows_appear_in_both_tables(learned_bench):
    cfg, lines = learned_bench
    for name in ("table.csv",):  # generation is left out to keep the test short; test_bench.py covers it
        rows = {r[0]: r for r in csv.reader((cfg.out / name).open())}
        for method in DATA_AWARE:
            values = [float(v) for v in rows[f"merge:{method}"][1:]]
            assert all(0.0 <= v <= 1.0 for v in values), (name, method)
    results = json.loads((cfg.out / "results.json").read_text())["seeds"][0]
    assert results["chosen"]["regmean"] in BN.GRIDS["regmean"]
    for method in BL.LEARNED_ROWS:  # the learning summary stands where a grid's trials would
        learned = results["validation"][method][0]
        assert learned["steps"] >= 1 and learned["seconds"] >= 0
        assert any(f"{method}" in line and "learned in" in line for line in lines)


def test_a_rerun_learns_and_merges_nothing(learned_bench, monkeypatch):
    cfg, _ = learned_bench

    def fail(*args, **kwargs):
        raise AssertionError("the rerun should have found this in the cache")

    monkeypatch.setattr(BL, "_adamerging", fail)
    monkeypatch.setattr(BL, "_dam", fail)
    monkeypatch.setattr(BN, "merge_into", fail)
    monkeypatch.setattr(BN, "score", fail)
    again = BN.BenchConfig(**{**cfg.__dict__, "out": cfg.out})
    BN.run_bench(again, log=lambda m: None)


def test_a_dam_entry_whose_coefficients_are_gone_is_learned_again(zoo, tmp_path, monkeypatch):
    cache = BN.EvalCache(tmp_path / "evals")
    calls = []

    def fake_dam(zoo, seed, data, knobs, folder, device, progress):
        calls.append(folder)
        (folder / "c.safetensors").write_bytes(b"x")
        return {"recipe": {"merge_method": "dam", "parameters": {"coefficients": str(folder / "c.safetensors")}},
                "steps": 1, "objective_before": 1.0, "objective_after": 0.5}

    monkeypatch.setattr(BL, "_dam", fake_dam)
    kw = dict(cache=cache, work=tmp_path, device="cpu", val_limit=None, progress=False, log=lambda m: None)
    recipe, _ = BL.learn_row(zoo, "dam", 0, **kw)
    BL.learn_row(zoo, "dam", 0, **kw)
    assert len(calls) == 1  # cached
    (calls[0] / "c.safetensors").unlink()
    BL.learn_row(zoo, "dam", 0, **kw)
    assert len(calls) == 2


def test_data_comes_from_train_and_validation_only(zoo, stub_learners):
    """Calibration: each expert's own skill's train file. AdaMerging: validation prompts. DAM: train."""
    for method in ("regmean", "regmean_plusplus", "fisher"):
        recipe = BN.recipe_for(zoo, method, {}, seed=0)
        for skill, entry in zip(zoo.trained, recipe["models"]):
            assert entry["model"] == str(zoo.experts[skill])
            assert entry["calibration"]["files"] == [str(zoo.tasks["train"]["gen"][skill])]
        assert "files" not in recipe["calibration"]  # no default that could reach another split
    assert "calibration" not in BN.recipe_for(zoo, "ties", {"density": 0.2, "lambda": 1.0}, seed=0)

    seen, learn = stub_learners
    learn(zoo, "adamerging")
    learn(zoo, "dam")
    (adamerging_data, _), = seen["adamerging"]
    assert adamerging_data and all("/validation/mc/" in f for f in adamerging_data)
    assert seen["dam"][0][0] == [str(zoo.tasks["train"]["gen"][s]) for s in zoo.trained]


def test_learned_rows_are_accepted_by_methods_and_named_by_data_aware():
    assert BN.method_problems(DATA_AWARE) == []
    assert set(DATA_AWARE) == set(BN.parse_methods("data-aware"))
    assert not set(DATA_AWARE) & set(BN.ALL_METHODS)  # 'all' is the README's training-free table
    assert BN.method_problems(("adamerge",))  # a typo is still caught
