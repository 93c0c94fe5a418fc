"""The benchmark: tables in the promised shape, hyperparameters from validation only."""

import csv
import json

import pytest

from mergesmith.errors import InputError
from mergesmith.zoo import bench as BN
from mergesmith.zoo import skills as S


@pytest.fixture(scope="module")
def bench_out(zoo, zoo_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    cfg = BN.BenchConfig(out=out, size="test", seeds=(0,), methods=("linear", "ties"),
                         cache=zoo_cache, limit=8, val_limit=6, progress=False)
    BN.run_bench(cfg, log=lambda msg: None)
    return out


def test_outputs_have_the_promised_shape(bench_out):
    for name in ("table.md", "table.csv", "table_generation.csv", "accuracy.png", "results.json"):
        assert (bench_out / name).stat().st_size > 0, name
    from mergesmith.zoo.pool import DISTRACTORS

    want_rows = ["base", *[f"expert:{s}" for s in S.TRAINED], "lora:strings",
                 *[f"distractor:{d.name}" for d in DISTRACTORS], "multitask", "merge:linear", "merge:ties"]
    for name in ("table.csv", "table_generation.csv"):
        rows = list(csv.reader((bench_out / name).open()))
        assert rows[0] == ["model", *S.TRAINED, *S.HELDOUT, "avg_trained", "avg_heldout"]
        assert [r[0] for r in rows[1:]] == want_rows
        for r in rows[1:]:
            values = [float(v) for v in r[1:]]
            assert all(0.0 <= v <= 1.0 for v in values)
            trained = values[:len(S.TRAINED)]
            assert values[-2] == pytest.approx(sum(trained) / len(trained), abs=1e-3)
    text = (bench_out / "table.md").read_text()
    assert "normalized" in text and "merge:ties" in text and "Chosen hyperparameters" in text
    assert "Best merge on the held-out skills" in text and "gap to multitask" in text
    for skill in S.HELDOUT:
        assert f"| {skill} | " in text.split("Held-out skills: multitask against base")[1]


def test_cached_scores_are_keyed_by_the_task_items(zoo):
    """A task file with other items (a new held-out skill, another limit) gets a new key."""
    files = zoo.task_files("test", "mc", list(zoo.heldout))
    a = BN.task_set_key(BN.load_task_set(files, "mc", 5))
    assert BN.task_set_key(BN.load_task_set(files, "mc", 5)) == a
    assert BN.task_set_key(BN.load_task_set(files, "mc", 6)) != a
    assert BN.task_set_key(BN.load_task_set(files[:-1], "mc", 5)) != a


def test_chosen_hyperparameters_come_from_the_grid(bench_out):
    results = json.loads((bench_out / "results.json").read_text())
    seed = results["seeds"][0]
    assert seed["chosen"]["ties"] in BN.GRIDS["ties"]
    trials = seed["validation"]["ties"]
    assert len(trials) == len(BN.GRIDS["ties"])
    best = max(t["validation"] for t in trials)
    assert next(t for t in trials if t["params"] == seed["chosen"]["ties"])["validation"] == best


def test_selection_sees_validation_files_only(zoo, tmp_path, monkeypatch):
    seen = []

    def fake_score(model, tasks, device, batch_size):
        seen.extend(t.source for t in tasks)
        return {t.name: 0.5 for t in tasks}

    monkeypatch.setattr(BN, "score", fake_score)
    monkeypatch.setattr(BN, "merge_into", lambda recipe, out, device: 0.0)
    val = BN.load_task_set(zoo.task_files("validation", "mc", list(zoo.trained)), "mc", 4)
    cfg = BN.BenchConfig(out=tmp_path, size="test", progress=False)
    best, trials = BN.select(cfg, zoo, "ties", 0, val, BN.EvalCache(tmp_path / "c"),
                             tmp_path / "m", print)
    assert seen and all("/validation/" in s for s in seen)
    assert best == BN.GRIDS["ties"][0]  # all tied: the first point wins


def test_recipes(zoo):
    ties = BN.recipe_for(zoo, "ties", {"density": 0.2, "lambda": 1.5}, seed=3)
    assert ties["base_model"] == str(zoo.base)
    assert ties["parameters"] == {"lambda": 1.5} and ties["random_seed"] == 3
    assert [m["model"] for m in ties["models"]] == [str(zoo.experts[s]) for s in zoo.trained]
    assert all(m["parameters"] == {"density": 0.2, "weight": 1.0} for m in ties["models"])
    linear = BN.recipe_for(zoo, "linear", {}, seed=0)
    assert "base_model" not in linear  # an average of the experts alone


def test_summary_math():
    trained, heldout = ("a", "b"), ("h",)

    def seed_result(seed, merged_a):
        r = BN.SeedResult(seed=seed, zoo_root="")
        r.scores = {
            "base": {"mc": {"a": 0.2, "b": 0.2, "h": 0.5}},
            "expert:a": {"mc": {"a": 0.8, "b": 0.2, "h": 0.5}},
            "expert:b": {"mc": {"a": 0.2, "b": 0.6, "h": 0.5}},
            "multitask": {"mc": {"a": 0.8, "b": 0.6, "h": 0.5}},
            "lora:a": {"mc": {"a": 0.4, "b": 0.2, "h": 0.5}},
            "merge:x": {"mc": {"a": merged_a, "b": 0.3, "h": 0.7}},
        }
        return r

    rows = BN.summarize([seed_result(0, 0.4), seed_result(1, 0.6)], trained, heldout, "mc")
    assert list(rows) == ["base", "expert:a", "expert:b", "lora:a", "multitask", "merge:x"]
    mean, spread = rows["merge:x"]["avg_trained"]
    assert mean == pytest.approx((0.35 + 0.45) / 2) and spread == pytest.approx(0.0707, abs=1e-3)
    # normalized: (0.4/0.8 + 0.3/0.6)/2 = 0.5 and (0.6/0.8 + 0.5)/2 = 0.625
    assert rows["merge:x"]["normalized"][0] == pytest.approx(0.5625)
    assert rows["multitask"]["normalized"][0] == pytest.approx(1.0)
    assert rows["lora:a"]["normalized"][0] == pytest.approx((0.4 / 0.8 + 0.2 / 0.6) / 2)


def test_unknown_method_is_an_input_error():
    with pytest.raises(InputError, match="nope"):
        BN.check_methods(("linear", "nope"))
    assert BN.parse_methods("demo") == BN.DEMO_METHODS
    assert BN.parse_methods("linear, ties") == ("linear", "ties")


def test_every_grid_method_is_registered():
    from mergesmith.methods import all_methods
    from mergesmith.zoo.bench_learned import LEARNED_ROWS

    assert set(BN.GRIDS) <= set(all_methods()) | set(LEARNED_ROWS)  # adamerging is a learning step
    assert set(BN.ALL_METHODS) | set(BN.DATA_AWARE_METHODS) == set(BN.GRIDS)
    assert not set(BN.ALL_METHODS) & set(BN.DATA_AWARE_METHODS)
    assert BN.parse_methods("everything") == BN.ALL_METHODS + BN.DATA_AWARE_METHODS


def test_cli_zoo_build_and_bench_help(zoo, zoo_cache, capsys):
    from mergesmith.cli import main

    assert main(["zoo", "build", "--size", "test", "--cache", str(zoo_cache)]) == 0
    assert str(zoo.root) in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--help"])
    assert exit_info.value.code == 0
    assert main(["bench", "--size", "test", "--cache", str(zoo_cache), "--methods", "nope"]) == 2
