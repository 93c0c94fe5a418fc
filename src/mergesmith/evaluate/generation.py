"""Greedy generation with stop sequences and a token limit.

Prompts are encoded like multiple-choice contexts (special prefix added by hand,
none for chat-templated prompts), left-truncated to leave room for
``max_new_tokens``, sorted by length and left-padded into batches for
``transformers``' ``generate`` (greedy, no sampling, whatever the model's own
generation config says). The text is cut at the first stop sequence; the end of
sequence token always stops.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from mergesmith.errors import InputError
from mergesmith.evaluate.model import LoadedModel
from mergesmith.evaluate.prompts import Context
from mergesmith.evaluate.scoring import batches, prefix_for
from mergesmith.evaluate.tasks import Item, Task


@dataclass
class GenRequest:
    index: int
    prompt: list[int]
    truncated: int = 0

    @property
    def work(self) -> int:
        return len(self.prompt)


def encode_gen(lm: LoadedModel, task: Task, items: list[Item], contexts: list[Context]) -> list[GenRequest]:
    room = lm.max_length - task.settings.max_new_tokens
    if room < 1:
        raise InputError(f"task {task.name}: generation.max_new_tokens {task.settings.max_new_tokens} leaves no "
                         f"room for a prompt in the model's context of {lm.max_length}; lower it")
    ids = lm.encode([c.text for c in contexts])
    out = []
    for n, (item, ctx) in enumerate(zip(items, contexts)):
        prompt = prefix_for(lm, ctx, ctx.text) + ids[n]
        if not prompt:
            if lm.start_id is None:
                raise InputError(f"task {task.name}: {item.row} (id {item.id}): empty prompt and no BOS/EOS token")
            prompt = [lm.start_id]
        req = GenRequest(n, prompt)
        if len(prompt) > room:
            req.truncated, req.prompt = len(prompt) - room, prompt[-room:]
        out.append(req)
    return out


def cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    cuts = [text.index(s) for s in stop if s and s in text]
    return text[:min(cuts)] if cuts else text


def _generate_batch(lm: LoadedModel, batch: list[GenRequest], max_new_tokens: int,
                    stop: tuple[str, ...]) -> list[str]:
    from transformers import GenerationConfig

    width = max(len(r.prompt) for r in batch)
    ids = torch.full((len(batch), width), lm.pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, r in enumerate(batch):
        ids[i, width - len(r.prompt):] = torch.tensor(r.prompt)
        mask[i, width - len(r.prompt):] = 1
    tok = lm.tokenizer
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                              pad_token_id=lm.pad_id, eos_token_id=tok.eos_token_id,
                              bos_token_id=tok.bos_token_id, stop_strings=list(stop) or None)
    out = lm.model.generate(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device),
                            generation_config=config, tokenizer=tok if stop else None)
    new = out[:, width:].cpu()
    texts = []
    for row in new:
        tokens = row.tolist()
        if tok.eos_token_id is not None and tok.eos_token_id in tokens:
            tokens = tokens[:tokens.index(tok.eos_token_id)]
        texts.append(cut_at_stop(tok.decode(tokens, skip_special_tokens=True), stop))
    return texts


def generate(lm: LoadedModel, task: Task, requests: list[GenRequest], *, batch_size: int = 8, pacer=None,
             progress=None) -> dict[int, str]:
    """Generate for every request; with a pacer, stop before a batch that would overrun the budget."""
    s = task.settings
    texts: dict[int, str] = {}
    with torch.inference_mode():
        for batch in batches(requests, batch_size, lambda r: len(r.prompt)):
            work = sum(r.work + s.max_new_tokens for r in batch)
            if pacer is not None and not pacer.allows("generation", work):
                break
            start = time.monotonic()
            results = _generate_batch(lm, batch, s.max_new_tokens, s.stop)
            if pacer is not None:
                pacer.record("generation", work, time.monotonic() - start)
            for r, text in zip(batch, results):
                texts[r.index] = text
            if progress is not None:
                progress.update(len(batch))
    return texts
