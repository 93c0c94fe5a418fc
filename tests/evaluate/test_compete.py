"""Competition mode: budget accounting, clean stops, submission files, the CLI end to end."""

import csv
import json
import time

import pytest
import yaml

from eval_data import GEN_ROWS, MC_ROWS, build_model, write_jsonl
from merge_helpers import copy_merge, slow_merge
from mergesmith.cli import main
from mergesmith.errors import InputError
from mergesmith.evaluate import Pacer, evaluate, load_tasks
from mergesmith.evaluate.compete import compete, write_submissions
from mergesmith.units import parse_budget
from test_tasks import COMPETITION_CSV, VALIDATION_CSV


class FakeClock:
    """Time that moves only when told, plus ``step`` seconds at every reading."""

    def __init__(self, step=0.0):
        self.now, self.step = 1000.0, step

    def __call__(self):
        self.now += self.step
        return self.now

    def advance(self, seconds):
        self.now += seconds


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.reader(fh))


@pytest.mark.parametrize("text, seconds", [("1h", 3600), ("45m", 2700), ("90s", 90), ("1h30m", 5400),
                                           ("3600", 3600), ("1.5h", 5400), (120, 120)])
def test_parse_budget(text, seconds):
    assert parse_budget(text) == seconds


@pytest.mark.parametrize("text", ["", "1d", "h", "-5", "0", "ten minutes"])
def test_bad_budget(text):
    with pytest.raises(InputError, match="budget"):
        parse_budget(text)


def test_pacer_refuses_a_batch_that_would_overrun_and_everything_after():
    clock = FakeClock()
    pacer = Pacer(deadline=clock.now + 10, safety=1.0, clock=clock)
    assert pacer.allows("multiple_choice", 1000)  # nothing measured yet: any time left is enough
    pacer.record("multiple_choice", 4, 2.0)  # 0.5 s per token
    assert pacer.allows("multiple_choice", 19)  # 9.5 s of the 10 left
    assert not pacer.allows("multiple_choice", 21)  # 10.5 s
    assert not pacer.allows("multiple_choice", 1)  # stopped: the unscored part is a clean tail
    late = Pacer(deadline=clock.now - 1, clock=clock)
    assert not late.allows("generation", 1)


def test_evaluation_stops_cleanly_at_the_deadline(tiny_model, tokenizer, mc_file):
    clock = FakeClock(step=10.0)  # every batch check costs ten seconds: two batches fit
    pacer = Pacer(deadline=clock.now + 25, clock=clock)
    result = evaluate(tiny_model, load_tasks([mc_file]), tokenizer=tokenizer, batch_size=2, progress=False,
                      bootstrap=0, pacer=pacer)
    t = result.tasks[0]
    assert (t.n_scored, t.n_not_run) == (4, 2) and not result.complete
    # batches run longest prompt first, so the items left are the two shortest prompts
    lengths = {r["id"]: len(tokenizer(r["prompt"])["input_ids"]) for r in MC_ROWS}
    not_run = set(result.not_run["mc"])
    assert max(lengths[i] for i in not_run) <= min(lengths[i] for i in lengths if i not in not_run)
    assert t.score == pytest.approx(sum(p.scores["acc"] for p in result.predictions if p.scores) / 4)
    assert all(p.prediction is None for p in result.predictions if p.id in not_run)


@pytest.fixture(scope="module")
def two_models(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("parents")
    paths = []
    for seed in (1, 2):
        path = root / f"parent{seed}"
        model = build_model(tokenizer, seed=seed)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths.append(path)
    return paths


def linear_recipe(paths):
    return {"merge_method": "linear", "dtype": "float32",
            "models": [{"model": str(p), "parameters": {"weight": 0.5}} for p in paths]}


def test_compete_end_to_end_with_the_merge_engine(tmp_path, two_models, capsys):
    pytest.importorskip("mergesmith.engine")
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(yaml.safe_dump(linear_recipe(two_models)), encoding="utf-8")
    tasks = tmp_path / "val.csv"
    tasks.write_text(VALIDATION_CSV, encoding="utf-8")
    out = tmp_path / "run"
    rc = main(["compete", str(recipe), "--tasks", str(tasks), "--budget", "10m", "--out", str(out),
               "--no-progress", "--bootstrap", "50"])
    assert rc == 0
    report = json.loads((out / "compete.json").read_text())
    assert [p["name"] for p in report["phases"]] == ["load_tasks", "check_recipe", "merge", "load_model",
                                                      "evaluate", "write"]
    assert all(p["status"] == "done" for p in report["phases"]) and report["complete"]
    assert report["used_s"] == pytest.approx(sum(p["seconds"] for p in report["phases"]))
    assert report["used_s"] < report["budget_s"]
    results = json.loads((out / "results.json").read_text())
    assert set(results["tasks"]) == {"val.multiple_choice", "val.generation"}
    # the submission: every input row, in order, as the competition wants it
    rows = read_csv(out / "submission.csv")
    assert rows[0] == ["id", "prediction", "dummy_field"] and [r[0] for r in rows[1:]] == ["0", "1", "2"]
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    by_id = {p["id"]: p for p in predictions}
    # (a NUL the tiny model generated is written to the CSV as U+FFFD: write_csv_atomic)
    as_csv = lambda p: str(p).replace("\x00", "\ufffd")  # noqa: E731
    assert rows[1][1] == as_csv(by_id["0"]["prediction"]) and rows[3][1] == as_csv(by_id["2"]["prediction"])
    # the scores are those of the merged model as written to disk
    again = evaluate(str(out / "model"), load_tasks([tasks]), progress=False, bootstrap=0)
    for p in again.predictions:
        if p.loglikelihoods:
            assert p.loglikelihoods == pytest.approx(by_id[p.id]["loglikelihoods"], abs=1e-5)
    assert "macro average" in capsys.readouterr().out


def test_merge_over_budget_is_stopped_and_nothing_scored(tmp_path, mc_file):
    start = time.monotonic()
    result = compete({"models": []}, [mc_file], tmp_path / "run", budget="3s", merge_fn=slow_merge,
                     progress=False, bootstrap=0)
    assert time.monotonic() - start < 60  # the two-minute merge was stopped
    statuses = {p.name: p.status for p in result.phases}
    assert statuses["merge"] == "stopped_at_budget" and statuses["evaluate"] == "skipped"
    assert result.not_scored == {"mc": len(MC_ROWS)} and not result.complete
    rows = read_csv(tmp_path / "run" / "submission.csv")
    assert [r[0] for r in rows[1:]] == [r["id"] for r in MC_ROWS] and all(r[1] == "" for r in rows[1:])
    report = json.loads((tmp_path / "run" / "compete.json").read_text())
    assert report["not_scored"] == {"mc": len(MC_ROWS)}
    assert json.loads((tmp_path / "run" / "results.json").read_text())["complete"] is False


def test_budget_running_out_during_evaluation(tmp_path, model_dir, mc_file, gen_file, capsys):
    clock = FakeClock(step=1.0)
    # the merge takes 85 of the 100 seconds; every clock reading costs one more
    recipe = {"models": [{"model": str(model_dir)}], "_advance_clock": clock, "_merge_seconds": 85}
    result = compete(recipe, [mc_file, gen_file], tmp_path / "run", budget=100, merge_fn=copy_merge,
                     isolate_merge=False, batch_size=1, progress=False, bootstrap=0, clock=clock)
    statuses = {p.name: p.status for p in result.phases}
    assert statuses["merge"] == "done" and statuses["evaluate"] == "stopped_at_budget"
    ev = result.evaluation
    scored = sum(t.n_scored for t in ev.tasks)
    assert 0 < scored < len(MC_ROWS) + len(GEN_ROWS)
    assert sum(result.not_scored.values()) == len(MC_ROWS) + len(GEN_ROWS) - scored
    assert result.used_s <= result.budget_s
    for name, path in (("mc", "submission-mc.csv"), ("gen", "submission-gen.csv")):
        rows = read_csv(tmp_path / "run" / path)
        missing = set(ev.not_run.get(name, []))
        assert {r[0] for r in rows[1:] if r[1] == ""} == missing
    assert "NOT SCORED" in result.summary()


def test_compete_cli_exit_code_when_budget_runs_out(tmp_path, mc_file, monkeypatch, capsys):
    import mergesmith.evaluate.compete as compete_module

    real = compete_module.compete
    monkeypatch.setattr(compete_module, "compete",
                        lambda *a, **k: real(*a, **dict(k, merge_fn=slow_merge)))
    recipe = tmp_path / "r.yml"
    recipe.write_text("merge_method: linear\n", encoding="utf-8")
    rc = main(["compete", str(recipe), "--tasks", str(mc_file), "--budget", "2s", "--out", str(tmp_path / "o"),
               "--no-progress"])
    assert rc == 3
    assert "NOT SCORED" in capsys.readouterr().out


def test_compete_rejects_bad_input_before_merging(tmp_path, mc_file):
    (tmp_path / "empty.jsonl").write_text("", encoding="utf-8")
    with pytest.raises(InputError, match="no items"):
        compete({}, [tmp_path / "empty.jsonl"], tmp_path / "o", budget="1h", merge_fn=slow_merge)
    (tmp_path / "o2" / "model").mkdir(parents=True)
    with pytest.raises(InputError, match="already exists"):
        compete({}, [mc_file], tmp_path / "o2", budget="1h", merge_fn=slow_merge)
    with pytest.raises(InputError, match="budget"):
        compete({}, [mc_file], tmp_path / "o3", budget="soon", merge_fn=slow_merge)


def test_bad_recipe_is_an_input_error(tmp_path, mc_file, two_models):
    pytest.importorskip("mergesmith.engine")
    recipe = dict(linear_recipe(two_models), merge_method="no_such_method")
    with pytest.raises(InputError):
        compete(recipe, [mc_file], tmp_path / "o", budget="1h", progress=False)


# ----------------------------------------------------------------------------- submission format


def test_submission_matches_the_competition_format(tmp_path, tiny_model, tokenizer):
    src = tmp_path / "test.csv"
    src.write_text(COMPETITION_CSV + '5,"Q?",multiple_choice,"[\'a\'"\n', encoding="utf-8")
    tasks = load_tasks([src], skip_bad_rows=True)
    result = evaluate(tiny_model, tasks, tokenizer=tokenizer, progress=False, bootstrap=0)
    (path,) = write_submissions(tasks, result.predictions, tmp_path / "out", submission_format="plain")
    rows = read_csv(path)
    source = read_csv(src)
    assert rows[0] == ["id", "prediction"]
    assert [r[0] for r in rows[1:]] == [r[0] for r in source[1:]]  # every input row, in input order
    kinds = {r[0]: r[2] for r in source[1:]}
    preds = {p.id: p for p in result.predictions}
    for row_id, prediction in rows[1:]:
        if row_id == "5":
            assert prediction == ""  # the skipped bad row keeps its place, unpredicted
        elif kinds[row_id] == "multiple_choice":
            assert prediction == str(preds[row_id].prediction) and 0 <= int(prediction) < len(
                preds[row_id].loglikelihoods)
        else:
            assert prediction == preds[row_id].prediction
    # the default: the starter kit's columns, its constant dummy_field 0 (pandas writes the int 0 as "0")
    (kit,) = write_submissions(tasks, result.predictions, tmp_path / "kit")
    kit_rows = read_csv(kit)
    assert kit_rows[0] == ["id", "prediction", "dummy_field"]
    assert [r[:2] for r in kit_rows] == rows and {r[2] for r in kit_rows[1:]} == {"0"}
    assert not [p for p in (tmp_path / "kit").iterdir() if p.name != "submission.csv"]  # no temporary file left
    with pytest.raises(InputError, match="--submission-format 'kaggle'"):
        write_submissions(tasks, result.predictions, tmp_path / "x", submission_format="kaggle")


# ----------------------------------------------------------------------------- mergesmith evaluate


def test_evaluate_cli_writes_results_and_predictions(tmp_path, model_dir, mc_file, gen_file, capsys):
    out = tmp_path / "eval"
    rc = main(["evaluate", str(model_dir), "--tasks", str(mc_file), str(gen_file), "--out", str(out),
               "--no-progress", "--bootstrap", "200"])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    scores = [results["tasks"][n]["score"] for n in ("mc", "gen")]
    assert results["macro_average"]["score"] == pytest.approx(sum(scores) / 2)
    low, high = results["macro_average"]["ci95"]
    assert low <= results["macro_average"]["score"] <= high
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [(p["task"], p["id"]) for p in lines] == [("mc", r["id"]) for r in MC_ROWS] + \
        [("gen", r["id"]) for r in GEN_ROWS]
    for p, row in zip(lines, MC_ROWS):
        assert len(p["loglikelihoods"]) == len(row["choices"])
        assert p["prediction"] == max(range(len(row["choices"])), key=p["loglikelihoods"].__getitem__)
    assert all(isinstance(p["prediction"], str) for p in lines[len(MC_ROWS):])
    table = capsys.readouterr().out
    assert "macro average (2 tasks)" in table and "acc" in table and "exact_match" in table


@pytest.mark.parametrize("case, message", [("empty", "no items"), ("no_tokenizer", "no usable tokenizer"),
                                           ("bad_row", "line 1 (id x)")])
def test_evaluate_cli_bad_input_exit_code(tmp_path, model_dir, mc_file, case, message, capsys):
    model, task = str(model_dir), str(mc_file)
    if case == "empty":
        task = str(tmp_path / "empty.jsonl")
        (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    elif case == "no_tokenizer":
        bare = tmp_path / "bare"
        bare.mkdir()
        for name in ("config.json", "model.safetensors"):
            (bare / name).write_bytes((model_dir / name).read_bytes())
        model = str(bare)
    else:
        task = str(write_jsonl(tmp_path / "bad.jsonl", [{"id": "x", "type": "multiple_choice", "prompt": "p",
                                                           "choices": ["a", "b"], "answer": 3}]))
    rc = main(["evaluate", model, "--tasks", task, "--out", str(tmp_path / "o"), "--no-progress"])
    assert rc == 2 and message in capsys.readouterr().err
