"""``mergesmith zoo competition``: the zoo's tasks as competition CSVs, then compete and score on them."""

import csv
import json

import pytest
import yaml

from mergesmith.cli import main
from mergesmith.errors import InputError
from mergesmith.evaluate import evaluate, load_tasks
from mergesmith.evaluate.tasks import read_jsonl
from mergesmith.zoo.competition import write_competition

FILES = ("validation.csv", "test.csv", "test_key.csv")


def read_rows(path):
    with open(path, encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def header(path):
    with open(path, encoding="utf-8", newline="") as fh:
        return next(csv.reader(fh))


def zoo_items(zoo, split):
    """Every zoo item of a split by (form, id)."""
    out = {}
    for form, kind in (("mc", "multiple_choice"), ("gen", "generation")):
        for path in zoo.task_files(split, form):
            for item in read_jsonl(path)[0]:
                out[(kind, item.id)] = item
    return out


@pytest.fixture(scope="module")
def files(zoo, tmp_path_factory):
    out = tmp_path_factory.mktemp("competition")
    write_competition(zoo, out)
    return out


def test_columns_and_the_hidden_file(files):
    assert header(files / "validation.csv") == ["id", "input", "target", "answer_choices", "eval_type"]
    assert header(files / "test.csv") == ["id", "input", "eval_type", "answer_choices"]  # no target
    assert header(files / "test_key.csv") == ["id", "eval_type", "target", "answer_choices"]
    test, key = read_rows(files / "test.csv"), read_rows(files / "test_key.csv")
    assert [(r["id"], r["eval_type"], r["answer_choices"]) for r in test] == \
        [(r["id"], r["eval_type"], r["answer_choices"]) for r in key]
    assert not [p.name for p in files.iterdir() if p.name not in FILES]  # no temporary file left


@pytest.mark.parametrize("split, name", [("validation", "validation.csv"), ("test", "test_key.csv")])
def test_every_skill_has_both_kinds_and_every_item_once(zoo, files, split, name):
    rows = read_rows(files / name)
    per_skill = {}
    for r in rows:
        skill = r["id"].rsplit("-", 2)[0]  # the zoo's ids: <skill>-<split>-<n>
        per_skill.setdefault(skill, []).append(r["eval_type"])
    assert list(per_skill) == list(zoo.skills)  # trained and held-out, in the zoo's order
    for skill, kinds in per_skill.items():
        mc, gen = kinds.count("multiple_choice"), kinds.count("generation")
        assert mc >= 1 and gen >= 1 and mc - gen in (0, 1), skill  # half each, MC takes the odd one
    assert len({r["id"] for r in rows}) == len(rows) == len(zoo_items(zoo, split)) // 2


def test_round_trip_through_the_task_reader(zoo, files):
    """What the harness reads from the CSVs is the zoo's items, in the form each was given."""
    for split, path in (("validation", files / "validation.csv"), ("test", files / "test.csv")):
        expected = zoo_items(zoo, split)
        for task in load_tasks([path]):
            for item in task.items:
                want = expected[(item.type, item.id)]
                assert (item.prompt, item.choices) == (want.prompt, want.choices)
                if split == "validation":
                    assert (item.answer, item.references) == (want.answer, want.references)
                else:
                    assert not item.labelled  # hidden
    # the key holds the test answers as an index (multiple choice) or the reference (generation)
    expected = zoo_items(zoo, "test")
    for r in read_rows(files / "test_key.csv"):
        want = expected[(r["eval_type"], r["id"])]
        assert r["target"] == (str(want.answer) if r["eval_type"] == "multiple_choice" else want.references[0])


def test_deterministic_and_overwrite(zoo, files, tmp_path):
    again = tmp_path / "again"
    written = write_competition(zoo, again)
    for name in FILES:
        assert (again / name).read_bytes() == (files / name).read_bytes()
    test = next(w for w in written if w.path.name == "test.csv")
    assert test.rows == test.multiple_choice + test.generation == sum(map(sum, test.per_skill.values()))
    with pytest.raises(InputError) as err:
        write_competition(zoo, again)
    assert len(err.value.problems) == 3 and all("--overwrite" in p for p in err.value.problems)
    (again / "test.csv").write_text("stale", encoding="utf-8")
    write_competition(zoo, again, overwrite=True)
    assert (again / "test.csv").read_bytes() == (files / "test.csv").read_bytes()


def test_cli_refuses_before_building_a_zoo(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "test_key.csv").write_text("old", encoding="utf-8")
    cache = tmp_path / "empty-cache"
    rc = main(["zoo", "competition", "--size", "test", "--cache", str(cache), "--out", str(out)])
    assert rc == 2 and "test_key.csv already exists; pass --overwrite" in capsys.readouterr().err
    assert not cache.exists()  # nothing was built
    (tmp_path / "file").write_text("x", encoding="utf-8")
    rc = main(["zoo", "competition", "--size", "test", "--cache", str(cache), "--out", str(tmp_path / "file" / "d")])
    assert rc == 2 and not cache.exists()


def test_zoo_competition_compete_score_end_to_end(zoo, zoo_cache, tmp_path, capsys):
    """The zoo's competition files, compete on the hidden test file with a linear merge of two
    experts, then score against the key: the scorer's accuracy is the harness's on the same items."""
    comp = tmp_path / "comp"
    rc = main(["zoo", "competition", "--size", "test", "--cache", str(zoo_cache), "--out", str(comp)])
    printed = capsys.readouterr().out
    assert rc == 0 and "test.csv" in printed and "(held-out)" in printed
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(yaml.safe_dump({
        "merge_method": "linear", "dtype": "float32",
        "models": [{"model": str(zoo.experts[s]), "parameters": {"weight": 0.5}} for s in zoo.trained[:2]]}))
    run = tmp_path / "run"
    rc = main(["compete", str(recipe), "--tasks", str(comp / "test.csv"), "--budget", "30m", "--out", str(run),
               "--no-progress", "--bootstrap", "0", "--inline-merge"])  # no child process: seconds saved
    assert rc == 0
    capsys.readouterr()
    rc = main(["score", str(run / "submission.csv"), "--key", str(comp / "test_key.csv"), "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    mc, gen = report["by_type"]["multiple_choice"], report["by_type"]["generation"]
    key = read_rows(comp / "test_key.csv")
    assert mc["n"] + gen["n"] == len(key) and mc["empty"] == gen["empty"] == mc["invalid"] == 0
    assert all(0 <= x <= 1 for x in (mc["score"], gen["score"], report["overall"], report["micro"]))
    assert report["overall"] == pytest.approx((mc["score"] + gen["score"]) / 2)
    # the harness on the zoo's own JSONL items, the same multiple-choice ones, the merged model
    mc_ids = {r["id"] for r in key if r["eval_type"] == "multiple_choice"}
    subset = tmp_path / "mc.jsonl"
    with open(subset, "w", encoding="utf-8") as fh:
        for path in zoo.task_files("test", "mc"):
            for line in path.read_text(encoding="utf-8").splitlines():
                if json.loads(line)["id"] in mc_ids:
                    fh.write(line + "\n")
    harness = evaluate(str(run / "model"), load_tasks([subset]), progress=False, bootstrap=0)
    assert harness.tasks[0].n_scored == len(mc_ids)
    assert mc["score"] == pytest.approx(harness.tasks[0].score, abs=1e-12)
