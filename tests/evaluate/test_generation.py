"""Greedy generation against a step-by-step reference; stop sequences, limits, metrics."""

import pytest
import torch

from eval_data import GEN_ROWS
from mergesmith.evaluate import evaluate
from mergesmith.evaluate.tasks import Item, Task, TaskSettings


def reference_greedy(model, tok, prompt, max_new_tokens):
    """Argmax one token at a time, recomputing the whole sequence each step: the definition."""
    ids = [tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            new.append(nxt)
    return tok.decode(new, skip_special_tokens=True)


def gen_task(rows, **settings):
    items = [Item(id=r["id"], type="generation", prompt=r["prompt"], references=tuple(r["references"]),
                  position=n, row=f"line {n + 1}") for n, r in enumerate(rows)]
    return Task("g", "generation", items, TaskSettings(**settings), source="g.jsonl")


def run(model, tok, task, **kw):
    return evaluate(model, [task], tokenizer=tok, progress=False, bootstrap=0, **kw)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_greedy_matches_reference(tiny_model, tokenizer, batch_size):
    result = run(tiny_model, tokenizer, gen_task(GEN_ROWS, max_new_tokens=6), batch_size=batch_size)
    for pred, row in zip(result.predictions, GEN_ROWS):
        assert pred.prediction == reference_greedy(tiny_model, tokenizer, row["prompt"], 6)


def test_stop_sequence_cuts_the_text(tiny_model, tokenizer):
    full = reference_greedy(tiny_model, tokenizer, GEN_ROWS[0]["prompt"], 12)
    stop = full[len(full) // 2: len(full) // 2 + 2]  # something the model is known to generate
    assert stop and stop in full
    result = run(tiny_model, tokenizer, gen_task(GEN_ROWS[:1], max_new_tokens=12, stop=("@@never@@", stop)))
    assert result.predictions[0].prediction == full[:full.index(stop)]


def test_token_limit(tiny_model, tokenizer):
    result = run(tiny_model, tokenizer, gen_task(GEN_ROWS[:2], max_new_tokens=3))
    longer = []
    for pred, row in zip(result.predictions, GEN_ROWS):
        assert pred.prediction == reference_greedy(tiny_model, tokenizer, row["prompt"], 3)
        longer.append(reference_greedy(tiny_model, tokenizer, row["prompt"], 8) != pred.prediction)
    assert any(longer)  # the limit is what ended the text


def test_long_prompt_truncated_and_counted(tiny_model, tokenizer):
    rows = [{"id": "long", "prompt": "one two three four five six seven eight nine ten " * 8, "references": ["x"]}]
    result = run(tiny_model, tokenizer, gen_task(rows, max_new_tokens=4), max_length=24)
    assert result.tasks[0].truncated == 1 and result.predictions[0].truncated_tokens > 0
    ids = ([tokenizer.bos_token_id] + tokenizer(rows[0]["prompt"], add_special_tokens=False)["input_ids"])[-20:]
    new = []
    with torch.no_grad():
        for _ in range(4):
            new.append(int(tiny_model(torch.tensor([ids + new])).logits[0, -1].argmax()))
    assert result.predictions[0].prediction == tokenizer.decode(new, skip_special_tokens=True)


def test_generation_metrics_on_items(tiny_model, tokenizer):
    result = run(tiny_model, tokenizer, gen_task(GEN_ROWS, max_new_tokens=4, metric="f1"))
    t = result.tasks[0]
    assert t.headline == "f1" and set(t.metrics) == {"exact_match", "f1", "rougeL"}
    assert t.score == pytest.approx(sum(p.scores["f1"] for p in result.predictions) / len(GEN_ROWS))


def test_without_rouge_score_installed(tiny_model, tokenizer, monkeypatch):
    from mergesmith.errors import InputError
    from mergesmith.evaluate import metrics

    def missing():
        raise InputError("generation tasks need the rouge-score package")

    monkeypatch.setattr(metrics, "_rouge_scorer", missing)
    result = run(tiny_model, tokenizer, gen_task(GEN_ROWS, max_new_tokens=2))
    assert set(result.tasks[0].metrics) == {"exact_match", "f1"}
    assert any("rougeL not computed" in n for n in result.notes())
    with pytest.raises(InputError, match="metric is rougeL but the rouge-score package is not installed"):
        run(tiny_model, tokenizer, gen_task(GEN_ROWS, max_new_tokens=2, metric="rougeL"))
