"""Per-prompt summaries a router needs: a feature vector, or the model's own loss on the prompt.

Prompts are encoded as generation prompts are (the special prefix put back by hand,
left-truncated to the window), run ``batch_size`` at a time, left-padded.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from mergesmith.evaluate.model import LoadedModel
from mergesmith.evaluate.scoring import left_padded


def encode_prompts(lm: LoadedModel, texts: list[str]) -> list[list[int]]:
    """Token ids of each text with the tokenizer's special prefix, the last ``max_length`` kept."""
    ids = lm.encode(texts)
    out = []
    for text, row in zip(texts, ids):
        prefix = [] if lm.prefix_text and text.startswith(lm.prefix_text) else list(lm.prefix_ids)
        row = prefix + row
        if not row and lm.start_id is not None:
            row = [lm.start_id]
        out.append(row[-lm.max_length:])
    return out


def _starts(n: int, batch_size: int, progress: bool, what: str):
    return tqdm(range(0, n, batch_size), desc=what, unit="batch", disable=not progress)


def mean_last_hidden(lm: LoadedModel, texts: list[str], batch_size: int = 8, progress: bool = False) -> torch.Tensor:
    """(n, hidden) float32: each prompt's last-layer hidden state averaged over its own tokens."""
    rows = encode_prompts(lm, texts)
    feats = []
    with torch.inference_mode():
        for start in _starts(len(rows), batch_size, progress, "features"):
            ids, mask, positions = left_padded(lm, rows[start:start + batch_size])
            out = lm.model(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device),
                           position_ids=positions.to(lm.device), output_hidden_states=True, use_cache=False)
            m = mask.float()[:, :, None]
            last = out.hidden_states[-1].float().cpu()
            feats.append((last * m).sum(1) / m.sum(1).clamp(min=1))
    return torch.cat(feats) if feats else torch.zeros((0, 0))


def prompt_losses(lm: LoadedModel, texts: list[str], batch_size: int = 8, progress: bool = False) -> torch.Tensor:
    """(n,) float64: each prompt's mean next-token negative log-likelihood under the model,
    -1/(T-1) sum_{t>1} log p(x_t | x_<t); a one-token prompt scores 0."""
    rows = encode_prompts(lm, texts)
    losses = []
    with torch.inference_mode():
        for start in _starts(len(rows), batch_size, progress, "prompt losses"):
            ids, mask, positions = left_padded(lm, rows[start:start + batch_size])
            logits = lm.forward(ids, mask, positions).logits.float().cpu()
            logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
            keep = (mask[:, 1:] * mask[:, :-1]).double()
            losses.append(-(logp.double() * keep).sum(1) / keep.sum(1).clamp(min=1))
    return torch.cat(losses) if losses else torch.zeros(0, dtype=torch.float64)
