"""Loading tasks: JSONL, the competition's CSV, YAML configs, Hugging Face datasets; bad input."""

import json

import pytest
import yaml

from eval_data import GEN_ROWS, MC_ROWS, write_jsonl
from mergesmith.errors import InputError
from mergesmith.evaluate.tasks import load_tasks, parse_answer_choices, task_from_dataset

# A sample in the competition's format: the shapes found in the starter kit's data
# (quoted multi-line inputs, doubled quotes, stringified Python lists mixing quote
# styles, a generation row that carries answer_choices, "None" for no choices).
COMPETITION_CSV = '''id,input,eval_type,answer_choices
0,"Write an ad copy for a photo frame. Respond with at most 150 words.",generation,
1,"Question: Which activity is performed by the marketing department?
Answer:",multiple_choice,"['advertising', 'shipping', 'storage', 'quality control']"
2,"a = 'xyz'
b = 'xyz'
print(a is b)
",multiple_choice,"[""prints string 'b'"", 'checks if a is identical to b and prints True', 'swaps strings']"
3,"Classify: 'Similar' or 'Dissimilar'? Input: Sentence1: What is that? Output:",generation,"['Similar', 'Dissimilar']"
4,"The house Benjamin designed for Joseph was beautiful, so _ used it in his portfolio.",multiple_choice,"['Benjamin', 'Joseph']"
'''

VALIDATION_CSV = '''id,input,target,answer_choices,eval_type
0,"Context: I was walking home.
Question: What may happen next?",1,"['A', 'B', 'C', 'D']",multiple_choice
1,"Pick one: red or blue?",red,"['red', 'blue']",multiple_choice
2,"The ex-Reading defender denied charges. A summary is",Former footballer denies fraud.,None,generation
'''


def test_jsonl_items_and_fields(mc_file):
    (task,) = load_tasks([mc_file])
    assert task.name == "mc" and task.type == "multiple_choice" and task.headline == "acc"
    assert [i.id for i in task.items] == [r["id"] for r in MC_ROWS]
    first = task.items[0]
    assert first.prompt == MC_ROWS[0]["prompt"] and first.choices == tuple(MC_ROWS[0]["choices"])
    assert first.answer == 0 and first.row == "line 1"


def test_mixed_file_becomes_one_task_per_type(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [MC_ROWS[0], GEN_ROWS[0], MC_ROWS[1]])
    tasks = load_tasks([path])
    assert [(t.name, t.type, len(t.items)) for t in tasks] == [
        ("mixed.multiple_choice", "multiple_choice", 2), ("mixed.generation", "generation", 1)]
    assert [i.position for i in tasks[0].items] == [0, 2]  # positions keep the file order


def test_competition_csv_sample(tmp_path):
    path = tmp_path / "test.csv"
    path.write_text(COMPETITION_CSV, encoding="utf-8")
    mc, gen = load_tasks([path])
    assert mc.name == "test.multiple_choice" and gen.name == "test.generation"
    assert [i.id for i in mc.items] == ["1", "2", "4"]
    assert mc.items[0].prompt.endswith("department?\nAnswer:")
    assert mc.items[1].choices == ("prints string 'b'", "checks if a is identical to b and prints True",
                                   "swaps strings")
    assert mc.items[1].prompt == "a = 'xyz'\nb = 'xyz'\nprint(a is b)\n"
    assert all(i.answer is None for i in mc.items)  # no target column: predicted, not scored
    assert [i.id for i in gen.items] == ["0", "3"] and not any(i.labelled for i in gen.items)


def test_competition_csv_with_targets_in_any_column_order(tmp_path):
    path = tmp_path / "val.csv"
    path.write_text(VALIDATION_CSV, encoding="utf-8")
    mc, gen = load_tasks([path])
    assert [i.answer for i in mc.items] == [1, 0]  # an index, or the text of the right choice
    assert gen.items[0].references == ("Former footballer denies fraud.",)


@pytest.mark.parametrize("text, expected", [
    ("['a', 'b']", ["a", "b"]),
    ('["a", "b"]', ["a", "b"]),
    ("[\"it's\", 'x']", ["it's", "x"]),
    (["already", "a list"], None),
])
def test_parse_answer_choices(text, expected):
    if expected is None:
        with pytest.raises(Exception):
            parse_answer_choices(text)
    else:
        assert parse_answer_choices(text) == expected


@pytest.mark.parametrize("row, message", [
    ({"id": "a", "type": "multiple_choice", "prompt": "p", "answer": 0}, "field 'choices' is missing"),
    ({"id": "a", "type": "multiple_choice", "prompt": "p", "choices": ["x", "y"], "answer": 2},
     "answer 2 is out of range for 2 choices"),
    ({"id": "a", "type": "multiple_choice", "prompt": "p", "choices": ["x", "y"]}, "field 'answer' is missing"),
    ({"id": "a", "type": "multiple_choice", "prompt": "p", "choices": ["x", ""], "answer": 0},
     "choice 1 is empty"),
    ({"id": "a", "type": "multiple_choice", "prompt": "p", "choices": ["x"], "answer": 0}, "choices"),
    ({"id": "a", "type": "mc", "prompt": "p"}, "field 'type' is 'mc'"),
    ({"id": "a", "type": "generation", "prompt": 3, "references": []}, "prompt"),
])
def test_bad_jsonl_row_names_file_line_and_problem(tmp_path, row, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [MC_ROWS[0], row])
    with pytest.raises(InputError) as err:
        load_tasks([path])
    text = str(err.value)
    assert f"{path}: line 2 (id a)" in text and message in text
    assert "--skip-bad-rows" in text


def test_invalid_json_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(MC_ROWS[0]) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"broken.jsonl: line 2: not valid JSON"):
        load_tasks([path])


@pytest.mark.parametrize("row, message", [
    ('5,"Q?",multiple_choice,', "answer_choices is missing"),
    ('5,"Q?",multiple_choice,"[\'a\', \'b\'"', "is not a list"),
    ('5,"Q?",multiple_choice,"{1: 2}"', "must be a list of strings"),
    ('5,"Q?",classification,', "eval_type is 'classification'"),
])
def test_bad_csv_rows_name_file_and_row(tmp_path, row, message):
    path = tmp_path / "t.csv"
    path.write_text(COMPETITION_CSV + row + "\n", encoding="utf-8")
    with pytest.raises(InputError) as err:
        load_tasks([path])
    assert f"{path}: row 6 (id 5)" in str(err.value) and message in str(err.value)


def test_csv_target_out_of_range(tmp_path):
    path = tmp_path / "v.csv"
    path.write_text(VALIDATION_CSV + '3,"Q?",7,"[\'a\', \'b\']",multiple_choice\n', encoding="utf-8")
    with pytest.raises(InputError, match=r"row 4 \(id 3\): answer 7 is out of range for 2 choices"):
        load_tasks([path])


def test_csv_missing_columns(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("id,prompt\n0,hi\n", encoding="utf-8")
    with pytest.raises(InputError, match="missing column\\(s\\) input, eval_type"):
        load_tasks([path])


def test_skip_bad_rows_counts_them(tmp_path):
    rows = [MC_ROWS[0], {"id": "bad1", "type": "multiple_choice", "prompt": "p", "choices": ["x"], "answer": 0},
            MC_ROWS[1], {"id": "bad2", "type": "multiple_choice", "prompt": "p", "choices": ["x", "y"], "answer": 5}]
    path = write_jsonl(tmp_path / "some_bad.jsonl", rows)
    (task,) = load_tasks([path], skip_bad_rows=True)
    assert [i.id for i in task.items] == ["q1", "q2"]
    assert [(s.id, s.position) for s in task.skipped] == [("bad1", 1), ("bad2", 3)]


def test_all_rows_bad_even_when_skipping(tmp_path):
    path = write_jsonl(tmp_path / "allbad.jsonl", [{"id": "x", "type": "generation"}])
    with pytest.raises(InputError, match="all 1 rows were bad"):
        load_tasks([path], skip_bad_rows=True)


def test_empty_file(tmp_path):
    for name in ("empty.jsonl", "empty.csv"):
        (tmp_path / name).write_text("" if name.endswith("jsonl") else "", encoding="utf-8")
        with pytest.raises(InputError, match=f"{name}: no items"):
            load_tasks([tmp_path / name])


def test_problems_of_several_files_reported_together(tmp_path):
    with pytest.raises(InputError) as err:
        load_tasks([tmp_path / "missing.jsonl", tmp_path / "also.csv", tmp_path / "x.txt"])
    assert len(err.value.problems) == 3


def test_duplicate_ids(tmp_path):
    path = write_jsonl(tmp_path / "dup.jsonl", [MC_ROWS[0], MC_ROWS[0]])
    with pytest.raises(InputError, match=r"line 2: id 'q1' repeats line 1"):
        load_tasks([path])


def test_same_task_name_twice(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    paths = [write_jsonl(tmp_path / d / "mc.jsonl", MC_ROWS) for d in ("a", "b")]
    with pytest.raises(InputError, match="task name 'mc' is also used"):
        load_tasks(paths)


def test_yaml_config_settings(tmp_path, mc_file):
    write_jsonl(tmp_path / "shots.jsonl", MC_ROWS[3:])
    config = {"task": "capitals", "data": "mc.jsonl", "target_delimiter": " ", "metric": "acc_norm_chars",
              "description": "Answer the question.\n\n", "fewshot": {"num": 2, "data": "shots.jsonl", "seed": 7},
              "generation": {"max_new_tokens": 5, "stop": ["\n"]}, "limit": 3}
    (tmp_path / "capitals.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    (task,) = load_tasks([tmp_path / "capitals.yaml"])
    s = task.settings
    assert task.name == "capitals" and task.headline == "acc_norm_chars" and len(task.items) == 3
    assert s.target_delimiter == " " and s.description.startswith("Answer")
    assert s.fewshot.num == 2 and [i.id for i in s.fewshot.pool] == ["q4", "q5", "q6"] and s.fewshot.seed == 7
    assert s.max_new_tokens == 5 and s.stop == ("\n",)


@pytest.mark.parametrize("config, message", [
    ({"data": "mc.jsonl", "metric": "rougeL"}, "metric 'rougeL' is not a multiple_choice metric"),
    ({"data": "mc.jsonl", "fewshot": {"num": 9}}, "fewshot.num is 9 but only 6 labelled"),
    ({"data": "mc.jsonl", "temperature": 1}, "temperature"),
    ({"task": "x"}, "give exactly one of 'data:'"),
    ({"dataset": {"path": "json"}}, "needs 'type:"),
    ({"data": "mc.jsonl", "fewshot": {"num": 1, "multiturn": True}}, "multiturn needs chat_template"),
])
def test_bad_yaml_config(tmp_path, mc_file, config, message):
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    with pytest.raises(InputError, match="t.yaml") as err:
        load_tasks([tmp_path / "t.yaml"])
    assert message in str(err.value)


def test_headline_metric_default_by_type(tmp_path, gen_file, mc_file):
    tasks = load_tasks([mc_file, gen_file], metric={"generation": "rougeL"})
    assert [t.headline for t in tasks] == ["acc", "rougeL"]


# ----------------------------------------------------------------------------- Hugging Face datasets

ARC_LIKE = {
    "id": ["a1", "a2", "a3"],
    "question": ["Which is a planet?", "Which is a colour?", "Which is a number?"],
    "choices": [{"text": ["Jupiter", "Paris"], "label": ["A", "B"]},
                {"text": ["seven", "blue", "dog"], "label": ["A", "B", "C"]},
                {"text": ["cat", "nine"], "label": ["A", "B"]}],
    "answerKey": ["A", "B", "B"],
}
FIELDS = {"id": "id", "prompt": "question", "choices": "choices.text", "answer": "answerKey"}


def test_dataset_from_disk_with_field_mapping(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(ARC_LIKE)}).save_to_disk(str(tmp_path / "arc"))
    config = {"task": "arc_local", "type": "multiple_choice", "dataset": {"from_disk": "arc", "split": "test"},
              "fields": FIELDS, "target_delimiter": " "}
    (tmp_path / "arc.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    (task,) = load_tasks([tmp_path / "arc.yaml"])
    assert [(i.id, i.choices, i.answer) for i in task.items] == [
        ("a1", ("Jupiter", "Paris"), 0), ("a2", ("seven", "blue", "dog"), 1), ("a3", ("cat", "nine"), 1)]


def test_dataset_through_load_dataset_json_builder(tmp_path):
    pytest.importorskip("datasets")
    rows = [{"q": "one two", "refs": ["three"]}, {"q": "red green", "refs": "blue"}]
    write_jsonl(tmp_path / "gen.jsonl", rows)
    config = {"type": "generation", "dataset": {"path": "json", "data_files": "gen.jsonl", "split": "train"},
              "fields": {"prompt": "q", "references": "refs"}}
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    (task,) = load_tasks([tmp_path / "g.yaml"])
    assert [(i.id, i.prompt, i.references) for i in task.items] == [("0", "one two", ("three",)),
                                                                     ("1", "red green", ("blue",))]


def test_live_dataset_and_bad_mapping():
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict(ARC_LIKE)
    task = task_from_dataset(ds, "arc", "multiple_choice", FIELDS)
    assert task.labelled == 3
    with pytest.raises(InputError, match="row 0 \\(id a1\\): has no field 'question_text'; fix the 'fields:'"):
        task_from_dataset(ds, "arc", "multiple_choice", dict(FIELDS, prompt="question_text"))


def test_missing_hub_dataset_offline_is_reported(tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # read at import time, so patched here
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    config = {"type": "multiple_choice", "dataset": {"path": "no-such-user/no-such-dataset"}}
    (tmp_path / "hub.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    with pytest.raises(InputError, match="could not load dataset 'no-such-user/no-such-dataset'.*Offline"):
        load_tasks([tmp_path / "hub.yaml"])
