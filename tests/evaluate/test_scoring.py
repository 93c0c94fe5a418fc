"""Multiple-choice scoring against an independent, unbatched reference computation."""

import pytest
import torch

from eval_data import MC_ROWS, build_model
from mergesmith.evaluate import evaluate, load_tasks
from mergesmith.evaluate.metrics import mc_choices
from mergesmith.evaluate.tasks import FewShot, Item, Task, TaskSettings
from mergesmith.evaluate.prompts import render_context


def reference_ll(model, tok, context, continuation, *, bos=True, keep_ctx=None):
    """One forward of context+continuation, no batch, no padding, no cache: the plain definition.

    Trailing context whitespace moves into the continuation (the tokenization
    convention shared with lm-eval); every continuation token is scored.
    """
    ctx = context.rstrip()
    cont = context[len(ctx):] + continuation
    ctx_ids = ([tok.bos_token_id] if bos else []) + tok(ctx, add_special_tokens=False)["input_ids"]
    whole = tok(ctx + cont, add_special_tokens=False)["input_ids"]
    plain = ctx_ids[1:] if bos else ctx_ids
    assert whole[:len(plain)] == plain, "reference assumes no merge across the boundary"
    cont_ids = whole[len(plain):]
    if keep_ctx is not None:
        ctx_ids = ctx_ids[-keep_ctx:]
    ids = torch.tensor([ctx_ids + cont_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), -1)
    start = len(ctx_ids) - 1
    return sum(logp[start + j, t].item() for j, t in enumerate(cont_ids)), len(cont_ids)


def mc_task(rows, name="t", **settings):
    items = [Item(id=r["id"], type="multiple_choice", prompt=r["prompt"], choices=tuple(r["choices"]),
                  answer=r.get("answer"), position=n, row=f"line {n + 1}") for n, r in enumerate(rows)]
    return Task(name, "multiple_choice", items, TaskSettings(**settings), source=f"{name}.jsonl")


def run(model, tok, tasks, **kw):
    kw.setdefault("bootstrap", 0)
    return evaluate(model, tasks, tokenizer=tok, progress=False, **kw)


@pytest.mark.parametrize("batch_size", [1, 4, 16])
def test_matches_unbatched_reference(tiny_model, tokenizer, batch_size):
    result = run(tiny_model, tokenizer, [mc_task(MC_ROWS)], batch_size=batch_size)
    for pred, row in zip(result.predictions, MC_ROWS):
        refs = [reference_ll(tiny_model, tokenizer, row["prompt"], c) for c in row["choices"]]
        assert pred.loglikelihoods == pytest.approx([r[0] for r in refs], abs=1e-4)
        assert pred.num_tokens == [r[1] for r in refs]
        assert pred.prediction == max(range(len(refs)), key=lambda i: refs[i][0])


def test_full_strategy_agrees_with_shared_prefix(tiny_model, tokenizer):
    fast = run(tiny_model, tokenizer, [mc_task(MC_ROWS)], batch_size=3)
    full = run(tiny_model, tokenizer, [mc_task(MC_ROWS)], batch_size=5, strategy="full")
    for a, b in zip(fast.predictions, full.predictions):
        assert a.loglikelihoods == pytest.approx(b.loglikelihoods, abs=1e-4)
        assert a.chosen == b.chosen


def test_deterministic(tiny_model, tokenizer):
    a = run(tiny_model, tokenizer, [mc_task(MC_ROWS)])
    b = run(tiny_model, tokenizer, [mc_task(MC_ROWS)])
    assert [p.loglikelihoods for p in a.predictions] == [p.loglikelihoods for p in b.predictions]


def test_first_token_of_every_choice_is_scored(tiny_model, tokenizer):
    """Letter answers are one token each: dropping the first token would score every choice 0."""
    rows = [{"id": f"L{n}", "prompt": p, "choices": [" A", " B", " C", " D"], "answer": 1}
            for n, p in enumerate(["The answer is", "Choose the best answer: A, B, C or D.", "red green", "one"])]
    result = run(tiny_model, tokenizer, [mc_task(rows)])
    for pred, row in zip(result.predictions, rows):
        assert pred.num_tokens == [1, 1, 1, 1]
        refs = [reference_ll(tiny_model, tokenizer, row["prompt"], c)[0] for c in row["choices"]]
        assert pred.loglikelihoods == pytest.approx(refs, abs=1e-4)
        assert all(ll < 0 for ll in pred.loglikelihoods)
    assert len({p.prediction for p in result.predictions}) > 1  # not the constant tie-break to choice 0


def test_choice_appended_exactly_as_written(tiny_model, tokenizer):
    row = {"id": "x", "prompt": "Question: What is the capital of France?\nAnswer:", "choices": ["Paris", "blue"],
           "answer": 0}
    glued = run(tiny_model, tokenizer, [mc_task([row])]).predictions[0]
    refs = [reference_ll(tiny_model, tokenizer, row["prompt"], c)[0] for c in row["choices"]]  # "Answer:Paris"
    assert glued.loglikelihoods == pytest.approx(refs, abs=1e-4)
    spaced = run(tiny_model, tokenizer, [mc_task([row], target_delimiter=" ")]).predictions[0]
    written = run(tiny_model, tokenizer, [mc_task([dict(row, choices=[" Paris", " blue"])])]).predictions[0]
    assert spaced.loglikelihoods == pytest.approx(written.loglikelihoods, abs=1e-6)
    assert spaced.loglikelihoods != pytest.approx(glued.loglikelihoods, abs=1e-3)


def test_normalized_metrics_hand_computed():
    # ll -10 over 2 tokens / 5 chars vs -12 over 6 tokens / 10 chars
    chosen = mc_choices([-10.0, -12.0], [2, 6], ["abcde", "abcdefghij"])
    assert chosen == {"acc": 0, "acc_norm_chars": 1, "acc_norm_tokens": 1}
    assert mc_choices([-3.0, -3.0], [1, 1], ["a", "b"])["acc"] == 0  # ties go to the first choice


def test_task_metrics_are_means_of_item_scores(tiny_model, tokenizer):
    result = run(tiny_model, tokenizer, [mc_task(MC_ROWS, metric="acc_norm_tokens")])
    t = result.tasks[0]
    for metric in ("acc", "acc_norm_chars", "acc_norm_tokens"):
        hits = [p.chosen[metric] == row["answer"] for p, row in zip(result.predictions, MC_ROWS)]
        assert t.metrics[metric] == pytest.approx(sum(hits) / len(hits))
    assert t.score == t.metrics["acc_norm_tokens"]
    assert [p.prediction for p in result.predictions] == [p.chosen["acc_norm_tokens"] for p in result.predictions]


def test_long_prompt_truncated_from_the_left_and_counted(tiny_model, tokenizer):
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 6 + "The sun rises in the"
    rows = [{"id": "long", "prompt": long_prompt, "choices": [" east", " west every day"], "answer": 0},
            MC_ROWS[3]]
    result = run(tiny_model, tokenizer, [mc_task(rows)], max_length=32)
    pred = result.predictions[0]
    assert result.tasks[0].truncated == 1 and pred.truncated_tokens > 0
    assert result.predictions[1].truncated_tokens == 0
    # one context for all choices: what fits beside the longest choice (its last token is never fed)
    keep = 32 - max(pred.num_tokens) + 1
    refs = [reference_ll(tiny_model, tokenizer, long_prompt, c, keep_ctx=keep)[0] for c in rows[0]["choices"]]
    assert pred.loglikelihoods == pytest.approx(refs, abs=1e-4)
    n_ctx = len(tokenizer(long_prompt.rstrip())["input_ids"])
    assert pred.truncated_tokens == n_ctx - keep


def test_choice_longer_than_context_is_an_input_error(tiny_model, tokenizer):
    from mergesmith.errors import InputError

    rows = [{"id": "c", "prompt": "x", "choices": [" one two three four five six seven", " a"], "answer": 0}]
    with pytest.raises(InputError, match=r"t: line 1 \(id c\): a choice is \d+ tokens, longer than"):
        run(tiny_model, tokenizer, [mc_task(rows)], max_length=4)


def test_tokenizer_merge_across_boundary_is_encoded_separately(tiny_model, tokenizer):
    # "...the la" + "zy dog." tokenizes as "Ġl", "az", "y": the context's last token changes
    row = {"id": "m", "prompt": "The quick brown fox jumps over the la", "choices": ["zy dog.", "ke"], "answer": 0}
    result = run(tiny_model, tokenizer, [mc_task([row])])
    assert result.tasks[0].boundary_merges >= 1
    ctx = [tokenizer.bos_token_id] + tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
    cont = tokenizer("zy dog.", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(tiny_model(torch.tensor([ctx + cont])).logits[0].double(), -1)
    expected = sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont))
    assert result.predictions[0].loglikelihoods[0] == pytest.approx(expected, abs=1e-4)
    assert result.predictions[0].num_tokens[0] == len(cont)


def test_empty_prompt_conditions_on_bos(tiny_model, tokenizer):
    row = {"id": "e", "prompt": "", "choices": ["red green", "one two"], "answer": 0}
    result = run(tiny_model, tokenizer, [mc_task([row])])
    refs = [reference_ll(tiny_model, tokenizer, "", c)[0] for c in row["choices"]]
    assert result.predictions[0].loglikelihoods == pytest.approx(refs, abs=1e-4)


def test_prompt_already_starting_with_bos_gets_no_second_one(tiny_model, tokenizer):
    plain = {"id": "p", "prompt": "red green blue", "choices": [" yellow", " one"], "answer": 0}
    marked = dict(plain, prompt="<s>red green blue")
    a = run(tiny_model, tokenizer, [mc_task([plain])]).predictions[0]
    b = run(tiny_model, tokenizer, [mc_task([marked])]).predictions[0]
    assert a.loglikelihoods == pytest.approx(b.loglikelihoods, abs=1e-5)


def test_chat_template_renders_context_without_extra_bos(chat_tokenizer):
    model = build_model(chat_tokenizer)
    rows = MC_ROWS[:2]
    task = mc_task(rows, chat_template=True, system_prompt="Be brief.")
    result = run(model, chat_tokenizer, [task])
    for pred, row in zip(result.predictions, rows):
        text = f"<|system|>Be brief.\n<|user|>{row['prompt']}\n<|assistant|>"
        assert render_context(task, task.items[rows.index(row)], chat_tokenizer).text == text
        refs = [reference_ll(model, chat_tokenizer, text, c, bos=False)[0] for c in row["choices"]]
        assert pred.loglikelihoods == pytest.approx(refs, abs=1e-4)


def test_chat_template_missing_is_reported(tiny_model, tokenizer):
    from mergesmith.errors import InputError

    with pytest.raises(InputError, match="chat_template is true but the model's tokenizer has no chat template"):
        run(tiny_model, tokenizer, [mc_task(MC_ROWS[:1], chat_template=True)])


def test_fewshot_context_is_deterministic_and_excludes_the_item(tokenizer):
    task = mc_task(MC_ROWS, target_delimiter="", fewshot=FewShot(num=2, seed=3, delimiter="\n\n"),
                   description="Quiz.\n")
    contexts = {item.id: render_context(task, item, tokenizer).text for item in task.items}
    reordered = mc_task(list(reversed(MC_ROWS)), fewshot=FewShot(num=2, seed=3), description="Quiz.\n")
    assert contexts == {i.id: render_context(reordered, i, tokenizer).text for i in reordered.items}
    for item in task.items:
        text = contexts[item.id]
        parts = text[len("Quiz.\n"):].split("\n\n")
        assert text.startswith("Quiz.\n") and parts[-1] == item.prompt and len(parts) == 3
        shots = [r for r in MC_ROWS if r["prompt"] + r["choices"][r["answer"]] in parts[:2]]
        assert len(shots) == 2 and item.id not in {r["id"] for r in shots}


def test_fewshot_multiturn_chat(chat_tokenizer):
    task = mc_task(MC_ROWS, chat_template=True, fewshot=FewShot(num=1, seed=0, multiturn=True))
    text = render_context(task, task.items[0], chat_tokenizer).text
    assert text.count("<|user|>") == 2 and text.count("<|assistant|>") == 2
    assert text.endswith(f"<|user|>{MC_ROWS[0]['prompt']}\n<|assistant|>")


def test_live_model_and_folder_give_the_same_scores(model_dir, tiny_model, tokenizer, mc_file):
    from_folder = evaluate(str(model_dir), load_tasks([mc_file]), progress=False, bootstrap=0)
    live = run(tiny_model, tokenizer, load_tasks([mc_file]))
    for a, b in zip(from_folder.predictions, live.predictions):
        assert a.loglikelihoods == pytest.approx(b.loglikelihoods, abs=1e-5)


def test_live_model_training_flag_restored(tokenizer, mc_file):
    model = build_model(tokenizer)
    model.train()
    run(model, tokenizer, load_tasks([mc_file]))
    assert model.training


class _TupleCacheModel(torch.nn.Module):
    """A model whose cache cannot be re-indexed per choice (as some remote-code models return)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def forward(self, **kwargs):
        out = self.inner(**kwargs)
        out.past_key_values = ("legacy", "tuple")
        return out


def test_model_without_a_reusable_cache_falls_back_to_full_sequences(tiny_model, tokenizer):
    fast = run(tiny_model, tokenizer, [mc_task(MC_ROWS)])
    fallback = run(_TupleCacheModel(tiny_model), tokenizer, [mc_task(MC_ROWS)])
    for a, b in zip(fast.predictions, fallback.predictions):
        assert a.loglikelihoods == pytest.approx(b.loglikelihoods, abs=1e-4)
