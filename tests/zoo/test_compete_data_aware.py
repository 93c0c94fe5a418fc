"""compete with data-aware recipes on the test zoo: validation files as calibration data, AdaMerging on
the unlabeled test prompts, both inside the budget, and nothing left behind when the budget is too small."""

import json

import pytest
import yaml

from mergesmith.cli import main
from mergesmith.errors import InputError
from mergesmith.evaluate import compete_data as D
from mergesmith.evaluate.compete import DONE, SKIPPED, STOPPED, compete
from mergesmith.learn.adamerging import AdaMergingSettings

SKILLS = ["facts", "rule"]


@pytest.fixture(autouse=True)
def stats_cache(tmp_path, monkeypatch):
    """Statistics go to this test's folder, never to the user's cache (the child processes inherit it)."""
    monkeypatch.setenv("MERGESMITH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "calibration"


def recipe_file(zoo, folder, method, **extra):
    recipe = {"merge_method": method, "models": [{"model": str(zoo.experts[s])} for s in SKILLS],
              "dtype": "float32", **extra}
    path = folder / f"{method}.yml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def files(zoo, split):
    return [str(f) for f in zoo.task_files(split, "mc", SKILLS)]


def phases(result):
    return {p.name: p for p in result.phases}


def left_in(folder):
    return sorted(p.name for p in folder.rglob("*") if ".tmp-" in p.name or ".partial-" in p.name)


def test_regmean_takes_the_validation_files_as_calibration_data(zoo, tmp_path, stats_cache):
    recipe = recipe_file(zoo, tmp_path, "regmean", parameters={"alpha": 0.5})
    kw = dict(budget="10m", validation=files(zoo, "validation"), batch_size=16, bootstrap=0, progress=False)
    result = compete(recipe, files(zoo, "test"), tmp_path / "out", **kw)
    assert result.complete
    assert any("--validation files" in n and "calibration data" in n for n in result.notes)
    calibrate = phases(result)["calibrate"]
    assert calibrate.status == DONE and "computed 2" in calibrate.detail and calibrate.seconds > 0
    assert [p.name for p in result.phases][:4] == ["load_tasks", "check_recipe", "calibrate", "merge"]
    assert (tmp_path / "out" / "model" / "config.json").is_file()
    written = json.loads((tmp_path / "out" / "compete.json").read_text())
    assert written["notes"] == result.notes and written["used_s"] <= written["budget_s"]
    entries = sorted(p.name for p in stats_cache.iterdir())
    assert len(entries) == 2 and all(e.startswith("gram-") for e in entries)
    # The statistics were taken on the validation prompts: the cache entry says which files.
    index = json.loads((stats_cache / entries[0] / "index.json").read_text())
    assert index["settings"]["files"] == files(zoo, "validation")

    again = compete(recipe, files(zoo, "test"), tmp_path / "again", isolate_merge=False, **kw)
    assert phases(again)["calibrate"].detail == "every statistic was cached"


def test_a_data_aware_recipe_without_data_is_refused_before_any_work(zoo, tmp_path):
    recipe = recipe_file(zoo, tmp_path, "fisher")
    with pytest.raises(InputError, match="pass --validation FILES"):
        compete(recipe, files(zoo, "test"), tmp_path / "out", budget="10m", progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(InputError, match="--validation nope.jsonl: no such file"):
        compete(recipe, files(zoo, "test"), tmp_path / "out", budget="10m", validation=["nope.jsonl"])


def test_adamerge_learns_on_the_test_prompts_then_merges_the_learned_recipe(zoo, tmp_path):
    recipe = recipe_file(zoo, tmp_path, "task_arithmetic", base_model=str(zoo.base))
    settings = AdaMergingSettings(steps=2, batch_size=4, progress=False)
    # In this process (the isolated child runs in the budget tests below): spawning costs seconds.
    result = compete(recipe, files(zoo, "test"), tmp_path / "out", budget="10m", adamerge=settings,
                     isolate_merge=False, batch_size=16, bootstrap=0, progress=False)
    assert result.complete
    learn = phases(result)["learn"]
    assert learn.status == DONE and "2 of 2 steps" in learn.detail
    learned = yaml.safe_load((tmp_path / "out" / "learned.yml").read_text())
    assert learned["merge_method"] == "task_arithmetic" and learned["parameters"]["normalize"] is False
    trace = json.loads((tmp_path / "out" / "learned.json").read_text())
    assert trace["tasks"] == files(zoo, "test") and trace["steps_done"] == 2
    assert (tmp_path / "out" / "model" / "config.json").is_file()
    assert any("unlabeled prompts" in n for n in result.notes)


def test_adamerge_stops_at_its_share_of_the_budget_and_still_merges(zoo, tmp_path):
    recipe = recipe_file(zoo, tmp_path, "task_arithmetic", base_model=str(zoo.base))
    settings = AdaMergingSettings(steps=1000, batch_size=4, progress=False)
    ticks = iter(range(10 ** 6))  # a clock that moves one second at every reading
    # 1e-4 of ten minutes (60 ms) is spent before the first step: the learning stops with the initial weights
    result = compete(recipe, files(zoo, "test"), tmp_path / "out", budget="10m", adamerge=settings,
                     learn_share=1e-4, isolate_merge=False, batch_size=16, bootstrap=0, progress=False,
                     clock=lambda: float(next(ticks)))
    learn = phases(result)["learn"]
    assert learn.status == DONE and "0 of 1000 steps" in learn.detail and "no step fitted" in learn.detail
    assert result.complete and (tmp_path / "out" / "model" / "config.json").is_file()


@pytest.mark.parametrize("method", ["regmean", "task_arithmetic"])
def test_a_budget_too_small_stops_cleanly_and_leaves_nothing(zoo, tmp_path, stats_cache, method, capsys):
    extra = {"base_model": str(zoo.base)} if method == "task_arithmetic" else {}
    recipe = recipe_file(zoo, tmp_path, method, **extra)
    out = tmp_path / "out"
    args = ["compete", str(recipe), "--tasks", *files(zoo, "test"), "--out", str(out), "--budget", "2s",
            "--bootstrap", "0", "--no-progress"]
    args += ["--validation", *files(zoo, "validation")] if method == "regmean" else ["--adamerge"]
    assert main(args) == 3
    captured = capsys.readouterr()
    assert "did not finish within the budget and was stopped" in captured.out
    result = json.loads((out / "compete.json").read_text())
    by_name = {p["name"]: p for p in result["phases"]}
    first = by_name["calibrate" if method == "regmean" else "learn"]
    assert first["status"] == STOPPED and by_name["merge"]["status"] == SKIPPED
    assert not (out / "model").exists() and not (out / "learned.yml").exists()
    assert left_in(tmp_path) == []
    assert not stats_cache.exists() or not any((e / "index.json").exists() for e in stats_cache.iterdir())
    assert result["not_scored"]  # every item is listed as not scored, none silently missing


def test_clean_after_removes_only_the_stopped_process_entries(tmp_path):
    cache = tmp_path / "cache"
    (cache / ".gram-abc.tmp-123").mkdir(parents=True)
    (cache / ".gram-abc.tmp-456").mkdir()
    (cache / "gram-def").mkdir()
    D.clean_after(D.DataPlan(D.CALIBRATE, {}, cache_dir=cache), tmp_path, 123)
    assert sorted(p.name for p in cache.iterdir()) == [".gram-abc.tmp-456", "gram-def"]
    out = tmp_path / "out"
    out.mkdir()
    for name in ("learned.yml", ".learned.yml.tmp-9", ".learned.json.tmp-9", "results.json"):
        (out / name).write_text("x")
    D.clean_after(D.DataPlan(D.ADAMERGE, {}), out, 9)
    assert sorted(p.name for p in out.iterdir()) == ["results.json"]


def test_the_child_deadline_is_a_moment_on_the_shared_monotonic_clock():
    import pickle
    import time

    assert pickle.loads(pickle.dumps(D.Deadline(time.monotonic() - 1)))()
    assert not D.Deadline(time.monotonic() + 60)()


def test_learning_flags_without_adamerge_are_refused(tmp_path, capsys):
    (tmp_path / "t.jsonl").write_text("")
    code = main(["compete", "r.yml", "--tasks", str(tmp_path / "t.jsonl"), "--out", str(tmp_path / "o"),
                 "--budget", "1m", "--learn-steps", "5"])
    assert code == 2 and "--learn-steps: only used with --adamerge" in capsys.readouterr().err
