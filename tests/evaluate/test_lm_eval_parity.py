"""Parity with lm-evaluation-harness on the same tiny model, tokenizer and tasks.

lm-eval runs in-process (HFLM around the live model) on tasks exported by our
adapter to local JSONL files: no hub, no network.
"""

import json

import pytest

from eval_data import GEN_ROWS, MC_ROWS
from mergesmith.evaluate import evaluate
from mergesmith.evaluate.lm_eval_adapter import lm_eval_task_config, run_lm_eval
from mergesmith.evaluate.prompts import plain_context
from mergesmith.evaluate.tasks import FewShot, Item, Task, TaskSettings

pytest.importorskip("lm_eval")

UNSPACED = [dict(r, id=r["id"] + "u", choices=[c.lstrip() for c in r["choices"]]) for r in MC_ROWS]


def make_task(name, rows, kind="multiple_choice", **settings):
    items = [Item(id=r["id"], type=kind, prompt=r["prompt"], choices=tuple(r.get("choices", ())),
                  answer=r.get("answer"), references=tuple(r.get("references", ())), position=n)
             for n, r in enumerate(rows)]
    return Task(name, kind, items, TaskSettings(**settings), source=f"{name}.jsonl")


@pytest.fixture(scope="module")
def mc_tasks():
    return [
        make_task("as_written", MC_ROWS),  # delimiter "": the space is part of each choice
        make_task("space_delimited", UNSPACED, target_delimiter=" "),
        make_task("fewshot", UNSPACED, target_delimiter=" ", description="Answer briefly.\n",
                  fewshot=FewShot(num=2, seed=5)),
    ]


def test_task_mapping(tmp_path, mc_tasks):
    task = mc_tasks[2]
    config = lm_eval_task_config(task, tmp_path)
    assert config["target_delimiter"] == " " and lm_eval_task_config(mc_tasks[0], tmp_path)["target_delimiter"] == ""
    assert (config["output_type"], config["doc_to_text"], config["doc_to_choice"], config["doc_to_target"]) == \
        ("multiple_choice", "prompt", "choices", "answer")
    assert config["num_fewshot"] == 0 and [m["metric"] for m in config["metric_list"]] == ["acc", "acc_norm"]
    docs = [json.loads(line) for line in (tmp_path / "fewshot.jsonl").read_text().splitlines()]
    assert [d["prompt"] for d in docs] == [plain_context(task, i) for i in task.items]
    assert docs[0]["prompt"].startswith("Answer briefly.\n") and docs[0]["prompt"].count("\n\n") == 2


def test_multiple_choice_parity(tiny_model, tokenizer, mc_tasks):
    ours = evaluate(tiny_model, mc_tasks, tokenizer=tokenizer, progress=False, bootstrap=0, batch_size=4)
    theirs = run_lm_eval(tiny_model, mc_tasks, tokenizer=tokenizer, batch_size=4)
    for task in mc_tasks:
        mine = [p for p in ours.predictions if p.task == task.name]
        ref = theirs[task.name]
        assert [i["id"] for i in ref.items] == [p.id for p in mine]
        for p, r in zip(mine, ref.items):
            assert p.loglikelihoods == pytest.approx(r["loglikelihoods"], abs=1e-4)
            assert p.scores["acc"] == r["acc"]
            assert p.scores["acc_norm_chars"] == r["acc_norm"]  # lm-eval's acc_norm: per character
        result = ours.task(task.name)
        assert result.metrics["acc"] == pytest.approx(ref.metrics["acc"])
        assert result.metrics["acc_norm_chars"] == pytest.approx(ref.metrics["acc_norm"])


def test_generation_parity(tiny_model, tokenizer):
    task = make_task("gen", GEN_ROWS, kind="generation", max_new_tokens=6, stop=("\n",))
    ours = evaluate(tiny_model, [task], tokenizer=tokenizer, progress=False, bootstrap=0)
    theirs = run_lm_eval(tiny_model, [task], tokenizer=tokenizer, batch_size=2)
    assert [p.prediction for p in ours.predictions] == [i["prediction"] for i in theirs["gen"].items]
