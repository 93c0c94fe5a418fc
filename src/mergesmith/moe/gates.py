"""Router rows, computed as mergekit-moe 0.1.5 computes them (``mergekit/moe/router.py``).

For each layer l the router is a matrix G_l (experts x hidden); the router logits of a token
whose MLP input is x are G_l x. Per expert e, with P_e its positive and N_e its negative prompts:

- ``hidden``, ``hidden_last``: v_l(P) = mean over prompts p of h_l(p)[last token], where h_l is the
  residual stream entering layer l (``hidden_states[l]`` of the base model, l < L);
- ``hidden_avg``: v_l(P) = mean over prompts of the mean of h_l(p) over the prompt's tokens
  (mergekit also averages the padding positions in; we do not: docs/moe.md);
- ``cheap_embed``: v(P) = u / max(|u|, 1e-8) with u = sum over prompts and tokens of the token
  embeddings, the same for every layer;
- then g_{l,e} = d / max(|d|, 1e-8) with d = v_l(P_e) - v_l(N_e) (just v_l(P_e) without N_e);
- ``random``: g ~ N(0, 1); ``uniform_random``: g ~ U(-1/sqrt(H), 1/sqrt(H)), torch.nn.Linear's init.

Prompts are tokenized as mergekit does: the BOS token's text before each prompt, no other
special tokens, left-padded. Only the base model runs, one model at a time.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Callable, Optional

import torch

from mergesmith.moe.config import Expert

Summary = Callable[[list[str]], torch.Tensor]  # prompts -> (layers, hidden)


def unit_rows(v: torch.Tensor) -> torch.Tensor:
    """Each row over its L2 norm (norms under 1e-8 count as 1e-8, as mergekit clamps them)."""
    return v / v.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)


def expert_direction(summarize: Summary, expert: Expert) -> torch.Tensor:
    """g = unit(v(P) - v(N)) per layer: (layers, hidden)."""
    v = summarize(expert.positive_prompts or [])
    if expert.negative_prompts:
        v = v - summarize(expert.negative_prompts)
    return unit_rows(v)


def random_gates(layers: int, experts: int, hidden: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn((layers, experts, hidden), generator=generator)


def uniform_random_gates(layers: int, experts: int, hidden: int, generator: torch.Generator) -> torch.Tensor:
    bound = math.sqrt(1.0 / hidden)
    return torch.rand((layers, experts, hidden), generator=generator) * 2 * bound - bound


def cheap_embed_summary(embed: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, layers: int) -> torch.Tensor:
    """unit(sum of the prompts' token embeddings), repeated for every layer: (layers, hidden).
    (mergekit multiplies one-hot rows into the embedding; picking the rows is the same sum.)"""
    rows = embed.float()[ids] * mask.unsqueeze(-1)
    return unit_rows(rows.sum(dim=(0, 1)).unsqueeze(0)).repeat(layers, 1)


def prompt_states(hidden_states, mask: torch.Tensor, average: bool) -> torch.Tensor:
    """One state per layer and prompt, (layers, batch, hidden) in float32, from each layer's
    (batch, seq, hidden) states of a left-padded batch: the last token's, or (``average``) the mean
    over the prompt's own tokens."""
    m = mask.float()[:, :, None]
    picked = [((h.float().cpu() * m).sum(1) / m.sum(1).clamp(min=1)) if average else h[:, -1].float().cpu()
              for h in hidden_states]
    return torch.stack(picked)


def tokenize_like_mergekit(tokenizer, prompts: list[str]) -> list[list[int]]:
    return tokenizer([(tokenizer.bos_token or "") + p for p in prompts], add_special_tokens=False)["input_ids"]


def prompt_summarizer(mode: str, base_path, layers: int, device: str,
                      embed: Optional[torch.Tensor] = None, dtype: torch.dtype = torch.float32,
                      batch_size: int = 8) -> Summary:
    """The function v(P) for ``mode``; ``hidden*`` modes load the base model once (in ``dtype``; the
    states are averaged in float32) through ``mergesmith.evaluate``'s loader, and run ``batch_size``
    prompts at a time, keeping only one state per layer and prompt."""
    from mergesmith.evaluate.model import load_model
    from mergesmith.evaluate.scoring import left_padded

    lm = load_model(str(base_path), device=device, dtype=dtype) if mode != "cheap_embed" else None
    if lm is None:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(str(base_path))

    def summarize(prompts: list[str]) -> torch.Tensor:
        tok = lm.tokenizer if lm is not None else tokenizer
        ids_list = tokenize_like_mergekit(tok, prompts)
        if lm is None:  # the padding is masked out of the sum
            ids, mask, _ = left_padded(SimpleNamespace(pad_id=0), ids_list)
            return cheap_embed_summary(embed, ids, mask, layers)
        total = None
        for start in range(0, len(ids_list), batch_size):  # the mean of per-prompt states: exact in batches
            ids, mask, positions = left_padded(lm, ids_list[start:start + batch_size])
            with torch.no_grad():
                out = lm.model(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device),
                               position_ids=positions.to(lm.device), output_hidden_states=True, use_cache=False)
            part = prompt_states(out.hidden_states[:-1], mask, average=mode == "hidden_avg").sum(dim=1)
            total = part if total is None else total + part
        return total / len(ids_list)

    return summarize


def compute_gates(mode: str, experts: list[Expert], layers: int, hidden: int, *, base_path=None,
                  embed: Optional[torch.Tensor] = None, device: str = "cpu", seed: int = 0,
                  progress: bool = False, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Router rows of ``experts`` for every layer: (layers, len(experts), hidden), float32."""
    generator = torch.Generator().manual_seed(seed)
    if mode == "random":
        return random_gates(layers, len(experts), hidden, generator)
    if mode == "uniform_random":
        return uniform_random_gates(layers, len(experts), hidden, generator)
    from tqdm.auto import tqdm

    summarize = prompt_summarizer(mode, base_path, layers, device, embed, dtype)
    rows = [expert_direction(summarize, e) for e in tqdm(experts, desc="expert prompts", disable=not progress)]
    return torch.stack(rows, dim=1)


def degenerate_layers(gates: torch.Tensor, threshold: float = 5.0) -> list[int]:
    """Layers whose router matrix has condition number above ``threshold`` (mergekit's warning):
    rows so alike that some expert will rarely be chosen."""
    return [layer for layer in range(gates.shape[0]) if torch.linalg.cond(gates[layer].float()) > threshold]
