"""Training loops: pretraining on a packed token stream, fine-tuning on prompt/answer pairs.

Both are plain AdamW with warmup and cosine decay, seeded, with a tqdm bar. The
fine-tune computes the loss on the answer (and the end-of-text token) only: the
prompt is given, the skill is what follows it.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from mergesmith.zoo.skills import Example


@dataclass
class TrainLog:
    steps: int
    first_loss: float
    last_loss: float  # mean over the last tenth of the steps
    seconds: float

    def as_dict(self) -> dict:
        return {"steps": self.steps, "first_loss": round(self.first_loss, 4),
                "last_loss": round(self.last_loss, 4), "seconds": round(self.seconds, 1)}


def lr_at(step: int, steps: int, peak: float, warmup_frac: float = 0.05) -> float:
    warmup = max(1, int(steps * warmup_frac))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    # No weight decay on norms: it would pull them toward zero for no reason.
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    other = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.01},
                              {"params": other, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.98))


def _run(model, batches, steps: int, lr: float, desc: str, device: str, progress: bool) -> TrainLog:
    import time

    start = time.time()
    model.to(device).train()
    opt = _optimizer(model, lr)
    losses: list[float] = []
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False, unit="step")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        input_ids, labels, mask = (t.to(device) for t in next(batches))
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    tail = losses[-max(1, steps // 10):]
    return TrainLog(steps, losses[0], sum(tail) / len(tail), time.time() - start)


def _stream_batches(tokens: torch.Tensor, batch: int, block: int, seed: int):
    """Random windows of the packed stream, forever."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, len(tokens) - block - 1, (batch,), generator=gen)
        x = torch.stack([tokens[s:s + block] for s in starts.tolist()])
        yield x, x.clone(), torch.ones_like(x)


def pretrain(model, tokens: torch.Tensor, *, steps: int, batch: int, block: int, lr: float,
             seed: int, device: str = "cpu", progress: bool = True) -> TrainLog:
    batches = _stream_batches(tokens, batch, block, seed)
    return _run(model, batches, steps, lr, "pretrain", device, progress)


def encode_examples(tokenizer, examples: list[Example]) -> list[tuple[list[int], int]]:
    """Token ids of prompt + answer + end-of-text, and where the answer starts."""
    out = []
    for ex in examples:
        prompt = tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]
        full = tokenizer(ex.prompt + ex.answer, add_special_tokens=False)["input_ids"]
        out.append((full + [tokenizer.eos_token_id], len(prompt)))
    return out


def _example_batches(encoded: list[tuple[list[int], int]], batch: int, pad_id: int, seed: int):
    """Shuffled epochs of right-padded batches; labels only on the answer."""
    rng = random.Random(seed)
    order: list[int] = []
    while True:
        if len(order) < batch:
            fresh = list(range(len(encoded)))
            rng.shuffle(fresh)
            order += fresh
        chosen, order = order[:batch], order[batch:]
        width = max(len(encoded[i][0]) for i in chosen)
        ids = torch.full((batch, width), pad_id, dtype=torch.long)
        labels = torch.full((batch, width), -100, dtype=torch.long)
        mask = torch.zeros((batch, width), dtype=torch.long)
        for row, i in enumerate(chosen):
            seq, answer_at = encoded[i]
            ids[row, :len(seq)] = torch.tensor(seq)
            labels[row, answer_at:len(seq)] = torch.tensor(seq[answer_at:])
            mask[row, :len(seq)] = 1
        yield ids, labels, mask


def finetune(model, tokenizer, examples: list[Example], *, steps: int, batch: int, lr: float,
             seed: int, desc: str = "finetune", device: str = "cpu",
             progress: bool = True) -> TrainLog:
    encoded = encode_examples(tokenizer, examples)
    batches = _example_batches(encoded, batch, tokenizer.pad_token_id, seed)
    return _run(model, batches, steps, lr, desc, device, progress)
