"""Calibration text: which items, how they become token sequences, how they are batched.

Items come from task files in any format the evaluation harness reads
(``evaluate.tasks.load_tasks``); each becomes the exact context the harness would
condition on (``evaluate.prompts.render_context``: description, few-shot examples,
chat template), tokenized as the harness does (the BOS prefix put back by hand).

By default only prompts are used: Fisher merging samples its targets from the
model itself (see ``collect.collect_fisher``), so no answer is needed. With
``include_answers`` (the recipe's ``calibration.include_answers: true``) each
sequence is the context *followed by the item's gold answer*, tokenized exactly as
the harness scores a choice (``evaluate.scoring.encode_continuations``: the context
with its trailing whitespace moved into the continuation ``target_delimiter +
answer``, split where the encoding of the whole has the context's tokens): for
multiple choice the gold choice, for generation the first reference. A model
fine-tuned on prompt + answer then shows its activations at the answer positions,
where experts differ most; every item must then have a gold answer.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass
from typing import Iterator, Optional

import torch

from mergesmith.evaluate.model import LoadedModel
from mergesmith.evaluate.prompts import render_context
from mergesmith.errors import InputError
from mergesmith.evaluate.scoring import batches, encode_continuations, prefix_for
from mergesmith.evaluate.tasks import MULTIPLE_CHOICE, Item, Task, load_tasks


@dataclass(frozen=True)
class CalibrationSettings:
    """One model's calibration data and settings (the recipe's ``calibration:`` block, resolved)."""

    files: tuple[str, ...]
    samples: int = 256  # FusionBench's num_regmean_examples / num_fisher_examples
    max_length: int = 512
    seed: int = 0
    batch_size: int = 8
    # Bytes of statistics accumulators held at once; more passes over the data when they exceed it.
    # None ("auto"): see accumulator_bytes.
    memory: Optional[int] = None
    include_answers: bool = False  # each sequence is context + gold answer, not the context alone

    def accumulator_bytes(self, weight_bytes: int) -> int:
        """The accumulator budget for a model of ``weight_bytes`` (float32): ``memory`` when given, else
        a quarter of the model, at least 64 MiB and at most 2 GiB. Model + accumulators then stay
        within 1.25x the model, which leaves the rest of 2x to the runtime (about 0.4 GiB with
        transformers loaded) and one batch's activations (Fisher: one sequence's forward and
        backward) even on a model under 1 GiB; a machine that only just holds a large model is not
        asked for more than 2 GiB beside it. A larger budget only means fewer passes over the data."""
        if self.memory is not None:
            return self.memory
        return min(AUTO_MAX, max(AUTO_MIN, weight_bytes // 4))


AUTO_MIN = 64 * 1024 ** 2
AUTO_MAX = 2 * 1024 ** 3


@dataclass
class Sequence:
    index: int  # position among the selected items, fixed by the seed: also seeds Fisher's sampling
    ids: list[int]


def select_items(settings: CalibrationSettings) -> list[tuple[Task, Item]]:
    """``samples`` items drawn without replacement (seeded) from every task of the files, in file order."""
    tasks = load_tasks(list(settings.files))
    if settings.include_answers:
        check_answers(tasks)
    pool = [(task, item) for task in tasks for item in task.items]
    if len(pool) > settings.samples:
        keep = sorted(random.Random(settings.seed).sample(range(len(pool)), settings.samples))
        pool = [pool[i] for i in keep]
    return pool


def data_fingerprint(selected: list[tuple[Task, Item]]) -> str:
    """A hash of everything about the selected items that can change the rendered text."""
    digest = hashlib.sha256()
    for task, item in selected:
        record = {"task": task.name, "settings": repr(task.settings), "item": asdict(item)}
        digest.update(json.dumps(record, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def check_answers(tasks: list[Task]) -> None:
    """Calibrating on answers needs every item to have one (all items: the draw must not decide)."""
    problems = []
    for task in tasks:
        missing = [item for item in task.items if not item.labelled]
        if missing:
            first = missing[0]
            what = "an answer" if first.type == MULTIPLE_CHOICE else "references"
            problems.append(f"{task.source}: {len(missing)} of {len(task.items)} items have no gold answer (first: "
                            f"{first.row}, id {first.id}); calibrating on answers (calibration.include_answers: "
                            f"true, or --include-answers) needs {what} on every item; label them, or calibrate "
                            "on prompts only")
    if problems:
        raise InputError(problems)


def encode_items(lm: LoadedModel, selected: list[tuple[Task, Item]], max_length: int,
                 include_answers: bool = False) -> list[Sequence]:
    """Token ids of each item's context as the harness feeds it, followed by its gold answer's
    continuation with ``include_answers`` (see the module docstring); the last ``max_length`` kept."""
    out = []
    for index, (task, item) in enumerate(selected):
        ctx = render_context(task, item, lm.tokenizer)
        if include_answers:
            if not item.labelled:
                check_answers([task])  # the message for the whole file
            request = encode_continuations(lm, task, [item], [ctx], [(item.gold_text,)])[0]
            ids = request.context + request.continuations[0]
        else:
            ids = prefix_for(lm, ctx, ctx.text) + lm.encode([ctx.text])[0]
        if not ids and lm.start_id is not None:
            ids = [lm.start_id]
        if ids:
            out.append(Sequence(index, ids[-max_length:]))
    return out


def padded_batches(lm: LoadedModel, sequences: list[Sequence], batch_size: int
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(input_ids, attention_mask, position_ids), right-padded, longest first (the harness's order)."""
    for batch in batches(sequences, batch_size, lambda s: len(s.ids)):
        width = max(len(s.ids) for s in batch)
        ids = torch.full((len(batch), width), lm.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, seq in enumerate(batch):
            ids[row, :len(seq.ids)] = torch.tensor(seq.ids)
            mask[row, :len(seq.ids)] = 1
        positions = torch.arange(width).unsqueeze(0).expand(len(batch), -1)
        yield ids, mask, positions


def count_batches(sequences: list[Sequence], batch_size: int) -> int:
    return -(-len(sequences) // batch_size)


def token_count(sequences: list[Sequence]) -> int:
    return sum(len(s.ids) for s in sequences)
