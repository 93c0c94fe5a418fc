"""From an item to the exact text the model is conditioned on.

The context is ``description + few-shot examples + prompt``, joined by the few-shot
delimiter; each example is ``prompt + target_delimiter + answer``. With
``chat_template: true`` the same text becomes the user message of the model's own
chat template (few-shot examples become earlier turns with ``fewshot.multiturn``),
rendered by the tokenizer with the generation prompt appended.

Few-shot examples are drawn per item, from the pool in id order, by a generator
seeded with the task's seed and the item's id: the draw depends neither on the
order of the items nor on batching. With no ``fewshot.data``, the pool is the
task's own labelled items less the item itself.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from mergesmith.errors import InputError
from mergesmith.evaluate.tasks import Item, Task


@dataclass(frozen=True)
class Context:
    text: str
    templated: bool  # rendered by a chat template: the template owns the special tokens


def fewshot_examples(task: Task, item: Item) -> list[Item]:
    fs = task.settings.fewshot
    if fs.num == 0:
        return []
    own = not fs.pool
    pool = [p for p in (fs.pool or task.items)
            if p.labelled and p.prompt != item.prompt and not (own and p.id == item.id)]  # never the item itself
    if len(pool) < fs.num:
        raise InputError(f"task {task.name}: {item.row} (id {item.id}): fewshot.num is {fs.num} but only "
                         f"{len(pool)} other labelled examples are available; lower it or give fewshot.data")
    pool.sort(key=lambda p: (p.id, p.position))  # the draw must not depend on the order of the items
    rng = random.Random(f"{fs.seed}:{item.id}")
    return rng.sample(pool, fs.num)


def _example_text(task: Task, example: Item) -> str:
    return example.prompt + task.settings.target_delimiter + example.gold_text


def plain_context(task: Task, item: Item) -> str:
    """The context without any chat template (also what the lm-eval adapter exports)."""
    s = task.settings
    parts = [_example_text(task, ex) for ex in fewshot_examples(task, item)] + [item.prompt]
    text = s.fewshot.delimiter.join(parts)
    return s.description + text


def render_context(task: Task, item: Item, tokenizer) -> Context:
    s = task.settings
    if not s.chat_template:
        return Context(plain_context(task, item), templated=False)
    if not getattr(tokenizer, "chat_template", None):
        raise InputError(f"task {task.name}: chat_template is true but the model's tokenizer has no chat "
                         "template; set chat_template: false or use a tokenizer that has one")
    examples = fewshot_examples(task, item)
    if s.fewshot.multiturn:
        turns = [turn for ex in examples for turn in (("user", ex.prompt), ("assistant", ex.gold_text))]
        turns.append(("user", item.prompt))
    else:
        parts = [_example_text(task, ex) for ex in examples] + [item.prompt]
        turns = [("user", s.fewshot.delimiter.join(parts))]
    turns[0] = ("user", s.description + turns[0][1])  # the description opens the first user turn
    messages = [{"role": "system", "content": s.system_prompt}] if s.system_prompt else []
    messages += [{"role": role, "content": content} for role, content in turns]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return Context(text, templated=True)
