"""Multiple choice by log-likelihood: every token of every choice, the shared prompt run once.

Tokenization (the same split as lm-eval's HFLM, so the two agree token for token):
the continuation is ``target_delimiter + choice``; whitespace at the end of the
context moves to the front of the continuation (so " Paris" stays one token for
BPE tokenizers); the context is encoded alone and the continuation is what the
encoding of ``context + continuation`` has beyond it. Where the tokenizer merges
across that boundary (rare; lm-eval then silently scores the wrong tokens) the
continuation is encoded on its own instead, and the item is counted.

Scoring (``strategy="shared_prefix"``, the default): a batch of prompts, sorted by
length and left-padded, goes through the model once, keeping its key/value cache
and only the last position's logits, which give every choice's first token. The
cache is then repeated once per choice and the choices' remaining tokens run
against it in one more pass. A prompt is thus computed once instead of once per
choice, and the vocabulary projection runs on choice tokens only.
``strategy="full"`` runs every ``prompt + choice`` sequence whole (right-padded);
it is the reference the fast path is tested against and the fallback for models
without a usable cache.

A context longer than the window (less the longest choice) loses tokens from the
left, once for all choices of the item, and is counted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from mergesmith.errors import InputError
from mergesmith.evaluate.model import LoadedModel
from mergesmith.evaluate.prompts import Context
from mergesmith.evaluate.tasks import Item, Task

STRATEGIES = ("shared_prefix", "full")


class NoReusableCache(Exception):
    """The model returned no key/value cache that can be repeated per choice."""


@dataclass
class MCRequest:
    index: int  # the item's index in its task
    context: list[int]
    continuations: list[list[int]]
    truncated: int = 0  # context tokens dropped from the left
    merged: int = 0  # choices re-encoded because the tokenizer merged across the boundary

    @property
    def work(self) -> int:
        """Tokens the model processes for this item (the pacing unit)."""
        return len(self.context) + sum(len(c) - 1 for c in self.continuations)


@dataclass
class MCScore:
    loglikelihoods: list[float]
    num_tokens: list[int]


def encode_mc(lm: LoadedModel, task: Task, items: list[Item], contexts: list[Context]) -> list[MCRequest]:
    """Token ids for each item's context and choices (see the module docstring), fitted to the window."""
    requests = encode_continuations(lm, task, items, contexts, [item.choices for item in items])
    return [_truncate(lm, task, item, req) for item, req in zip(items, requests)]


def encode_continuations(lm: LoadedModel, task: Task, items: list[Item], contexts: list[Context],
                         texts: list[tuple[str, ...]]) -> list[MCRequest]:
    """Token ids for each item's context and the continuations ``target_delimiter + text`` of its
    ``texts`` (its choices, when scoring), split as the module docstring says; not truncated.
    Calibration on answers (``calibrate.data``) feeds the gold one through this same split."""
    delimiter = task.settings.target_delimiter
    stripped, conts = [], []
    for ctx, choices in zip(contexts, texts):
        text = ctx.text.rstrip()
        moved = ctx.text[len(text):]
        stripped.append(text)
        conts.append([moved + delimiter + choice for choice in choices])
    ctx_ids = lm.encode(stripped)
    whole_ids = lm.encode([s + c for s, cs in zip(stripped, conts) for c in cs])
    requests, k = [], 0
    for n, (item, ctx, text) in enumerate(zip(items, contexts, stripped)):
        prefix = prefix_for(lm, ctx, text)
        context = ctx_ids[n]
        continuations, merged = [], 0
        for cont_text in conts[n]:
            whole = whole_ids[k]
            k += 1
            if whole[:len(context)] == context and len(whole) > len(context):
                continuations.append(whole[len(context):])
            else:
                continuations.append(lm.encode([cont_text])[0])
                merged += 1
        context = prefix + context
        if not context:
            if lm.start_id is None:
                raise InputError(f"task {task.name}: {item.row} (id {item.id}): the context is empty and the "
                                 "tokenizer has neither BOS nor EOS to condition on; give the item a prompt")
            context = [lm.start_id]
        for j, cont in enumerate(continuations):
            if not cont:
                raise InputError(f"task {task.name}: {item.row} (id {item.id}): continuation {conts[n][j]!r} "
                                 "encodes to no tokens; check the choice or reference text")
        requests.append(MCRequest(n, context, continuations, merged=merged))
    return requests


def prefix_for(lm: LoadedModel, ctx: Context, text: str) -> list[int]:
    """The special tokens to put before a context (the BOS, usually), or none."""
    if ctx.templated or not lm.prefix_ids:
        return []  # a chat template writes its own special tokens
    if lm.prefix_text and text.startswith(lm.prefix_text):
        return []  # the prompt already starts with them
    return list(lm.prefix_ids)


def _truncate(lm: LoadedModel, task: Task, item: Item, req: MCRequest) -> MCRequest:
    longest = max(len(c) for c in req.continuations)
    room = lm.max_length - longest + 1  # the last choice token is predicted, never fed
    if room < 1:
        raise InputError(f"task {task.name}: {item.row} (id {item.id}): a choice is {longest} tokens, longer "
                         f"than the model's context of {lm.max_length}; shorten it or raise --max-length")
    if len(req.context) > room:
        req.truncated = len(req.context) - room
        req.context = req.context[-room:]
    return req


def batches(requests: list, batch_size: int, length: Callable) -> Iterator[list]:
    """Longest first (memory problems show at once, padding stays small), ties by position."""
    ordered = sorted(requests, key=lambda r: (-length(r), r.index))
    for start in range(0, len(ordered), batch_size):
        yield ordered[start:start + batch_size]


def _token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def left_padded(lm: LoadedModel, contexts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, position_ids) of token lists, left-padded: every row's last
    token sits in the last column, so ``last_only`` logits are each context's next-token prediction."""
    width = max(len(c) for c in contexts)
    ids = torch.full((len(contexts), width), lm.pad_id, dtype=torch.long)
    mask = torch.zeros((len(contexts), width), dtype=torch.long)
    for i, c in enumerate(contexts):
        ids[i, width - len(c):] = torch.tensor(c)
        mask[i, width - len(c):] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    return ids, mask, positions


def _score_shared(lm: LoadedModel, batch: list[MCRequest]) -> list[MCScore]:
    ids, mask, positions = left_padded(lm, [r.context for r in batch])
    rows = [(i, c) for i, r in enumerate(batch) for c in r.continuations]
    needs_rest = any(len(c) > 1 for _, c in rows)
    out = lm.forward(ids, mask, positions, use_cache=needs_rest, last_only=True)
    first_lp = torch.log_softmax(out.logits[:, -1].float(), dim=-1).cpu()
    totals = torch.tensor([first_lp[i, c[0]].item() for i, c in rows], dtype=torch.float64)
    if needs_rest:
        select = torch.tensor([i for i, _ in rows])
        cache = lm.cache_of(out)
        if not hasattr(cache, "batch_select_indices"):
            raise NoReusableCache(type(cache).__name__)
        cache.batch_select_indices(select.to(lm.device))
        steps = max(len(c) for _, c in rows) - 1
        inp = torch.full((len(rows), steps), lm.pad_id, dtype=torch.long)
        tgt = torch.zeros((len(rows), steps), dtype=torch.long)
        keep = torch.zeros((len(rows), steps), dtype=torch.long)
        for k, (_, c) in enumerate(rows):
            m = len(c) - 1
            inp[k, :m] = torch.tensor(c[:-1])
            tgt[k, :m] = torch.tensor(c[1:])
            keep[k, :m] = 1
        mask2 = torch.cat([mask[select], keep], dim=1)
        pos2 = mask.sum(1)[select].unsqueeze(1) + torch.arange(steps).unsqueeze(0)
        out2 = lm.forward(inp, mask2, pos2, past_key_values=cache, use_cache=False)
        lp = _token_logprobs(out2.logits, tgt.to(lm.device)).cpu().double()
        totals += (lp * keep).sum(1)
    return _collect(batch, totals)


def full_inputs(lm: LoadedModel, batch: list[MCRequest]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, position_ids) of every ``context + choice`` of ``batch``, one row per
    choice in request order, right-padded; the last choice token is predicted, never fed."""
    seqs = [r.context + c[:-1] for r in batch for c in r.continuations]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), lm.pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for k, s in enumerate(seqs):
        ids[k, :len(s)] = torch.tensor(s)
        mask[k, :len(s)] = 1
    positions = torch.arange(width).unsqueeze(0).expand(len(seqs), -1)
    return ids, mask, positions


def choice_loglikelihoods(logits: torch.Tensor, batch: list[MCRequest]) -> torch.Tensor:
    """Each choice's log-likelihood sum_j log p(c_j | context, c_<j) from the logits of ``full_inputs``:
    a float32 tensor, one entry per choice in request order, differentiable in ``logits``."""
    totals = []
    k = 0
    for r in batch:
        start = len(r.context) - 1
        for c in r.continuations:
            picked = logits[k, start:start + len(c)]
            totals.append(_token_logprobs(picked, torch.tensor(c, device=picked.device)).sum())
            k += 1
    return torch.stack(totals)


def _score_full(lm: LoadedModel, batch: list[MCRequest]) -> list[MCScore]:
    logits = lm.forward(*full_inputs(lm, batch)).logits
    return _collect(batch, choice_loglikelihoods(logits, batch).cpu().double())


def _collect(batch: list[MCRequest], totals: torch.Tensor) -> list[MCScore]:
    out, k = [], 0
    for r in batch:
        n = len(r.continuations)
        out.append(MCScore([float(x) for x in totals[k:k + n]], [len(c) for c in r.continuations]))
        k += n
    return out


def score_mc(lm: LoadedModel, requests: list[MCRequest], *, batch_size: int = 8,
             strategy: str = "shared_prefix", pacer=None, progress=None) -> dict[int, MCScore]:
    """Score every request; with a pacer, stop before a batch that would overrun the budget.

    Returns the scores by item index; indices missing from it were not run.
    """
    if strategy not in STRATEGIES:
        raise InputError(f"strategy {strategy!r} is not known; use one of {', '.join(STRATEGIES)}")
    scores: dict[int, MCScore] = {}
    fn = _score_shared if strategy == "shared_prefix" else _score_full
    with torch.inference_mode():
        for batch in batches(requests, batch_size, lambda r: len(r.context)):
            work = sum(r.work for r in batch)
            if pacer is not None and not pacer.allows("multiple_choice", work):
                break
            start = time.monotonic()
            try:
                results = fn(lm, batch)
            except NoReusableCache:
                fn = _score_full  # from now on, for this model
                results = fn(lm, batch)
            if pacer is not None:
                pacer.record("multiple_choice", work, time.monotonic() - start)
            for r, s in zip(batch, results):
                scores[r.index] = s
            if progress is not None:
                progress.update(len(batch))
    return scores
