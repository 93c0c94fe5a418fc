"""The competition's files: kit-shaped task rows, ROUGE-L as the generation headline, the scorer."""

import csv
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from merge_helpers import copy_merge
from mergesmith.cli import build_parser, main
from mergesmith.errors import InputError
from mergesmith.evaluate import evaluate, load_tasks
from mergesmith.evaluate.compete import compete, write_submissions
from mergesmith.evaluate.competition import (SUBMISSION_FORMATS, format_answer_choices, read_key,
                                             score_submission)
from mergesmith.evaluate.tasks import parse_answer_choices

# Rows in the shape of the starter kit's files (written for these tests, not copied): a long
# passage with lettered options whose choices are the letters themselves and whose target is an
# index (as in its cosmos_qa.csv); a question with text choices; a news passage ending in
# "A summary is" with the reference as target and "None" for choices (its xsum.csv); and an
# instruction-following prompt (its test.csv). The kit orders validation columns like this.
PASSAGE = ("The lighthouse keeper had kept a log for thirty years , noting every ship , every storm and every "
           "visitor who climbed the two hundred steps . In the winter the supply boat came only once a month , "
           "so he baked his own bread and mended his own nets . One night the lamp failed during a gale , and "
           "he turned the great lens by hand until morning while the wind shook the glass .\n") * 3
KIT_VALIDATION_CSV = [
    ["id", "input", "target", "answer_choices", "eval_type"],
    ["0", PASSAGE + "According to the above context, choose the best option to answer the following question.\n"
          "Question: Why did the keeper turn the lens by hand ?\nOptions:\nA. He wanted exercise .\n"
          "B. The lamp had failed in the storm .\nC. The supply boat asked him to .\nD. None of the above choices .",
     "1", "['A', 'B', 'C', 'D']", "multiple_choice"],
    ["1", PASSAGE + "According to the above context, answer the following question.\n"
          "How often did the supply boat come in winter ?",
     "0", "['Once a month', 'Every day', 'Never', 'None of the above choices .']", "multiple_choice"],
    ["2", PASSAGE + "A summary is", "A lighthouse keeper turned the lens by hand through a stormy night.",
     "None", "generation"],
    ["3", "Write a short note inviting neighbours to a street party. Respond with at most 50 words, and "
          "end with the word \"Cheers\".", "Join us on Saturday for a street party with music and food. Cheers",
     "", "generation"],
]


def write_rows(path, rows):
    with open(path, "w", encoding="utf-8", newline="") as fh:
        csv.writer(fh, lineterminator="\n").writerows(rows)
    return path


def read_rows(path):
    with open(path, encoding="utf-8", newline="") as fh:
        return list(csv.reader(fh))


def hidden_and_key(tmp_path):
    """The kit's hidden-test shape (no target column) and its answer key, from the validation rows."""
    header, *rows = KIT_VALIDATION_CSV
    hidden = write_rows(tmp_path / "test.csv", [["id", "input", "eval_type", "answer_choices"]] +
                        [[r[0], r[1], r[4], r[3]] for r in rows])
    key = write_rows(tmp_path / "test_key.csv", [["id", "eval_type", "target", "answer_choices"]] +
                     [[r[0], r[4], r[2], r[3]] for r in rows])
    return hidden, key


# ----------------------------------------------------------------------------- encoding


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(min_size=1), min_size=2, max_size=6))
def test_answer_choices_round_trip(choices):
    """The kit's encoding (repr of the list) reads back exactly, whatever quotes or escapes the text holds."""
    assert parse_answer_choices(format_answer_choices(choices)) == choices


def test_answer_choices_encoding_is_the_kits():
    assert format_answer_choices(["advertising", "shipping"]) == "['advertising', 'shipping']"
    assert format_answer_choices(["it's", "x"]) == "[\"it's\", 'x']"


def test_cli_formats_match_the_library():
    from mergesmith.evaluate import cli

    assert cli.SUBMISSION_FORMATS == SUBMISSION_FORMATS


def test_compete_submission_format_flags():
    parse = lambda *extra: build_parser().parse_args(  # noqa: E731
        ["compete", "r.yml", "--tasks", "t.csv", "--budget", "1h", "--out", "o", *extra])
    assert parse().submission_format == "kit"
    assert parse("--submission-format", "plain").submission_format == "plain"
    assert parse("--dummy-field").submission_format == "kit"  # the old opt-in flag still runs


# ----------------------------------------------------------------------------- the generation headline


def test_kit_shaped_rows_load(tmp_path):
    path = write_rows(tmp_path / "val.csv", KIT_VALIDATION_CSV)
    mc, gen = load_tasks([path])
    assert mc.items[0].choices == ("A", "B", "C", "D") and mc.items[0].answer == 1
    assert mc.items[0].prompt.endswith("D. None of the above choices .") and len(mc.items[0].prompt) > 1000
    assert mc.items[1].answer == 0
    assert [i.references for i in gen.items] == [(KIT_VALIDATION_CSV[3][2],), (KIT_VALIDATION_CSV[4][2],)]
    # the competition's metric heads a CSV's generation rows; multiple choice keeps accuracy
    assert (mc.headline, gen.headline) == ("acc", "rougeL")


def test_generation_headline_precedence(tmp_path, gen_file):
    import yaml

    path = write_rows(tmp_path / "val.csv", KIT_VALIDATION_CSV)
    assert load_tasks([path], metric={"generation": "exact_match"})[1].headline == "exact_match"  # --gen-metric
    (tmp_path / "val.yaml").write_text(yaml.safe_dump({"data": "val.csv", "metric": "f1", "type": "generation"}))
    assert load_tasks([tmp_path / "val.yaml"])[0].headline == "f1"  # the task's own config
    (tmp_path / "plain.yaml").write_text(yaml.safe_dump({"data": "val.csv", "type": "generation"}))
    assert load_tasks([tmp_path / "plain.yaml"])[0].headline == "rougeL"  # a config over a CSV: still the CSV's
    assert load_tasks([gen_file])[0].headline == "exact_match"  # JSONL: unchanged


def test_evaluate_headlines_rouge_and_reports_exact_match(tmp_path, tiny_model, tokenizer):
    path = write_rows(tmp_path / "val.csv", KIT_VALIDATION_CSV)
    result = evaluate(tiny_model, load_tasks([path]), tokenizer=tokenizer, progress=False, bootstrap=0)
    gen = result.task("val.generation")
    assert gen.headline == "rougeL" and set(gen.metrics) == {"exact_match", "f1", "rougeL"}
    rouge = [p.scores["rougeL"] for p in result.predictions if p.type == "generation"]
    assert gen.score == pytest.approx(sum(rouge) / 2)
    assert result.macro == pytest.approx((gen.score + result.task("val.multiple_choice").score) / 2)
    assert any(n.startswith("val.generation: also exact_match") for n in result.notes())


def test_without_rouge_score_a_labelled_csv_says_how_to_fix(tmp_path, tiny_model, tokenizer, monkeypatch):
    from mergesmith.evaluate import metrics

    def missing():
        raise InputError("generation tasks need the rouge-score package")

    monkeypatch.setattr(metrics, "_rouge_scorer", missing)
    path = write_rows(tmp_path / "val.csv", KIT_VALIDATION_CSV)
    with pytest.raises(InputError) as err:
        evaluate(tiny_model, load_tasks([path]), tokenizer=tokenizer, progress=False, bootstrap=0)
    message = str(err.value)
    assert "val.generation" in message and "competition CSV" in message
    assert "pip install 'mergesmith[eval]'" in message and "--gen-metric exact_match" in message
    # a hidden file is predicted, never scored: it runs without the package
    hidden, key = hidden_and_key(tmp_path)
    result = evaluate(tiny_model, load_tasks([hidden]), tokenizer=tokenizer, progress=False, bootstrap=0)
    assert all(p.prediction is not None for p in result.predictions)
    # and the scorer names the fix too
    submission = write_rows(tmp_path / "sub.csv", [["id", "prediction"]] + [[str(i), "0"] for i in range(4)])
    with pytest.raises(InputError, match=r"ROUGE-L, which needs the rouge-score package: pip install"):
        score_submission(submission, key)


# ----------------------------------------------------------------------------- the scorer


def test_score_hand_computed(tmp_path):
    key = write_rows(tmp_path / "key.csv", [
        ["id", "eval_type", "target", "answer_choices"],
        ["m1", "multiple_choice", "1", "['A', 'B', 'C', 'D']"],
        ["m2", "multiple_choice", "1", "['A', 'B', 'C', 'D']"],
        ["m3", "multiple_choice", "2", "['x', 'y', 'z']"],
        ["m4", "multiple_choice", "0", "['x', 'y']"],
        ["m5", "multiple_choice", "0", "['x', 'y']"],
        ["m6", "multiple_choice", "1", "['x', 'y']"],
        ["g1", "generation", "The cat sat on the mat.", ""],
        ["g2", "generation", "the cat sat on the mat", "None"],
        ["g3", "generation", "Paris", ""],
    ])
    submission = write_rows(tmp_path / "submission.csv", [
        ["id", "prediction", "dummy_field"],
        ["g1", "the cat lay on the mat", "0"],  # LCS 5 of 6 and 6 tokens: P = R = F = 5/6
        ["m1", "1", "0"],  # the index, as compete writes it: right
        ["m2", "B", "0"],  # the choice's text (a letter): right
        ["m3", "1", "0"],  # wrong
        ["m4", "", "0"],  # empty (not run): wrong
        ["m5", "7", "0"],  # out of range: wrong, invalid
        ["m6", "banana", "0"],  # not a choice: wrong, invalid
        ["g2", "cat on mat", "0"],  # LCS 3: P = 1, R = 1/2, F = 2/3
        ["g3", "paris", "0"],  # exact after normalization: F = 1
    ])
    report = score_submission(submission, key)
    mc, gen = report.by_type["multiple_choice"], report.by_type["generation"]
    assert (mc.score, mc.n, mc.empty, mc.invalid) == (pytest.approx(2 / 6), 6, 1, 2)
    rouge = (5 / 6 + 2 / 3 + 1) / 3
    assert gen.score == pytest.approx(rouge) and gen.metrics["exact_match"] == pytest.approx(1 / 3)
    assert report.overall == pytest.approx((2 / 6 + rouge) / 2)
    assert report.micro == pytest.approx((2 + 5 / 6 + 2 / 3 + 1) / 9)
    assert "rougeL" in report.table() and "exact_match 0.3333" in report.table()


def test_a_validation_file_is_a_key(tmp_path):
    """A labelled task file works as the key: its input column is ignored."""
    path = write_rows(tmp_path / "val.csv", KIT_VALIDATION_CSV)
    assert [(k.id, k.answer) for k in read_key(path)] == [("0", 1), ("1", 0), ("2", None), ("3", None)]
    submission = write_rows(tmp_path / "s.csv", [["id", "prediction"], ["0", "1"], ["1", "3"],
                                                 ["2", KIT_VALIDATION_CSV[3][2]], ["3", ""]])
    report = score_submission(submission, path)
    assert report.by_type["multiple_choice"].score == 0.5
    assert report.by_type["generation"].score == pytest.approx(0.5)  # one exact, one empty


def test_score_reports_every_problem_at_once(tmp_path, capsys):
    key = write_rows(tmp_path / "key.csv", [["id", "eval_type", "target"], ["a", "multiple_choice", "0"],
                                            ["b", "generation", "x"], ["c", "generation", "y"],
                                            ["c", "generation", "z"]])
    submission = write_rows(tmp_path / "sub.csv", [["id", "prediction"], ["a", "0"], ["a", "1"], ["zz", "q"]])
    rc = main(["score", str(submission), "--key", str(key)])
    err = capsys.readouterr().err
    assert rc == 2
    # the key's duplicate, the submission's duplicate; then (with both files readable) missing and unknown ids
    assert "key.csv: id 'c' appears 2 times (rows 3, 4)" in err and "sub.csv: id 'a' appears 2 times" in err
    with pytest.raises(InputError) as info:
        score_submission(write_rows(tmp_path / "s2.csv", [["id", "prediction"], ["a", "0"], ["zz", "q"]]),
                         write_rows(tmp_path / "k2.csv", [["id", "eval_type", "target"], ["a", "multiple_choice", "0"],
                                                          ["b", "generation", "x"], ["c", "generation", "y"]]))
    problems = info.value.problems
    assert len(problems) == 2
    assert "2 id(s) of the key" in problems[0] and "'b', 'c'" in problems[0]
    assert "1 id(s) are not in the key" in problems[1] and "'zz'" in problems[1]


def test_a_submission_without_rows_is_missing_every_id(tmp_path):
    key = write_rows(tmp_path / "key.csv", [["id", "eval_type", "target"], ["a", "multiple_choice", "0"],
                                            ["b", "generation", "x"]])
    submission = write_rows(tmp_path / "sub.csv", [["id", "prediction", "dummy_field"]])
    with pytest.raises(InputError, match=r"2 id\(s\) of the key .* have no row: 'a', 'b'"):
        score_submission(submission, key)


@pytest.mark.parametrize("sub_rows, key_rows, message", [
    ([["id", "pred"], ["a", "0"]], None, "missing column(s) prediction"),
    ([["id", "prediction", "score"], ["a", "0", "1"]], None, "unexpected column(s) score"),
    (None, [["id", "input", "eval_type"], ["a", "q", "multiple_choice"]],
     "missing column(s) target; an answer key has columns id, eval_type, target"),
    (None, [["id", "eval_type", "target", "answer_choices"], ["a", "multiple_choice", "5", "['x', 'y']"]],
     "row 1 (id a): target 5 is out of range for 2 choices"),
    (None, [["id", "eval_type", "target"], ["a", "mc", "0"]], "eval_type is 'mc'"),
    (None, [["id", "eval_type", "target"], ["a", "generation", ""]], "target is empty"),
])
def test_score_wrong_columns_and_rows(tmp_path, sub_rows, key_rows, message):
    submission = write_rows(tmp_path / "sub.csv", sub_rows or [["id", "prediction"], ["a", "0"]])
    key = write_rows(tmp_path / "key.csv", key_rows or [["id", "eval_type", "target"], ["a", "multiple_choice", "0"]])
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        score_submission(submission, key)


# ----------------------------------------------------------------------------- compete on the kit's shape


def test_compete_then_score_on_kit_shaped_files(tmp_path, model_dir, capsys):
    """compete reads the hidden kit-shaped file and writes the kit's submission; the scorer scores
    it against the key, agreeing with the harness on the same items."""
    hidden, key = hidden_and_key(tmp_path)
    out = tmp_path / "run"
    result = compete({"models": [{"model": str(model_dir)}]}, [hidden], out, budget="10m", merge_fn=copy_merge,
                     isolate_merge=False, progress=False, bootstrap=0)
    assert result.complete
    rows = read_rows(out / "submission.csv")
    assert rows[0] == ["id", "prediction", "dummy_field"] and [r[0] for r in rows[1:]] == ["0", "1", "2", "3"]
    rc = main(["score", str(out / "submission.csv"), "--key", str(key), "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    # the harness on the labelled file, same model: its accuracy and ROUGE-L are the scorer's
    labelled = write_rows(tmp_path / "val.csv", KIT_VALIDATION_CSV)
    harness = evaluate(str(out / "model"), load_tasks([labelled]), progress=False, bootstrap=0)
    assert report["by_type"]["multiple_choice"]["score"] == harness.task("val.multiple_choice").score
    assert report["by_type"]["generation"]["score"] == pytest.approx(harness.task("val.generation").score)
    assert report["overall"] == pytest.approx(harness.macro)
    assert all(0 <= t["score"] <= 1 for t in report["by_type"].values())
    # our plain id,prediction file scores the same
    (plain,) = write_submissions(load_tasks([hidden]), result.evaluation.predictions, tmp_path / "plain",
                                 submission_format="plain")
    assert read_rows(plain)[0] == ["id", "prediction"] and [r[:2] for r in read_rows(plain)] == [r[:2] for r in rows]
    assert score_submission(plain, key).to_dict()["by_type"] == report["by_type"]


def test_unknown_submission_format_is_refused_before_merging(tmp_path):
    hidden, _ = hidden_and_key(tmp_path)
    with pytest.raises(InputError, match="--submission-format 'csv'"):
        compete({"models": []}, [hidden], tmp_path / "x", budget="1m", merge_fn=copy_merge, submission_format="csv")
    assert not (tmp_path / "x").exists()


def test_a_nul_in_a_prediction_is_written_as_the_replacement_character(tmp_path):
    # Python 3.10's csv writer raises on NUL ("need to escape, but no escapechar set"); a tiny
    # model's greedy output can contain one.
    from mergesmith.evaluate.competition import write_csv_atomic

    path = write_csv_atomic(tmp_path / "submission.csv", ["id", "prediction"], [["a", "x\x00y"], ["b", "plain"]])
    text = path.read_text(encoding="utf-8")
    assert "\x00" not in text
    with open(path, newline="", encoding="utf-8") as fh:
        assert list(csv.reader(fh)) == [["id", "prediction"], ["a", "x\ufffdy"], ["b", "plain"]]
