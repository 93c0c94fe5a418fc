"""Routing accuracy: the share of each skill's tokens that the router sends to that skill's expert.

For expert e's texts (the labelled items of its task files: prompt, delimiter, gold answer), every
real token after the tokenizer's special prefix counts once per layer: it is a hit when e is the
router's top-1 choice there. Reported per expert and per layer, and overall as the mean over
experts of their hit rates (each expert weighs the same, whatever its number of tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Union

import torch


@dataclass
class RoutingReport:
    hits: torch.Tensor  # (experts, layers): tokens of expert e sent first to e at each layer
    tokens: torch.Tensor  # (experts,): tokens counted per expert

    @property
    def per_expert(self) -> torch.Tensor:
        """(experts,): hit rate of each expert's tokens, averaged over layers."""
        return self.hits.sum(1) / (self.tokens * self.hits.shape[1]).clamp(min=1)

    @property
    def accuracy(self) -> float:
        return self.per_expert.mean().item()

    def table(self) -> str:
        rate = self.hits / self.tokens[:, None].clamp(min=1)
        lines = ["expert  tokens  top-1 share (mean)  per layer"]
        for e in range(rate.shape[0]):
            layers = " ".join(f"{x:.2f}" for x in rate[e].tolist())
            lines.append(f"{e:6d}  {int(self.tokens[e]):6d}  {self.per_expert[e].item():18.3f}  {layers}")
        lines.append(f"routing accuracy (mean over experts): {self.accuracy:.3f}")
        return "\n".join(lines)


def expert_top1(lm, texts: list[str], batch_size: int = 8) -> list[torch.Tensor]:
    """Per layer, the top-1 expert of every real token after the special prefix: (tokens,) each."""
    from mergesmith.evaluate.scoring import left_padded

    chosen: list[list[torch.Tensor]] = []
    for start in range(0, len(texts), batch_size):
        encoded = [lm.prefix_ids + ids for ids in lm.encode(texts[start:start + batch_size])]
        ids, mask, positions = left_padded(lm, encoded)
        counted = mask.clone()
        for i, row in enumerate(encoded):  # the prefix (BOS) is the same for every skill
            counted[i, ids.shape[1] - len(row): ids.shape[1] - len(row) + len(lm.prefix_ids)] = 0
        with torch.no_grad():
            out = lm.model(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device),
                           position_ids=positions.to(lm.device), output_router_logits=True, use_cache=False)
        keep = counted.reshape(-1).bool()
        layers = [logits.float().cpu().argmax(-1)[keep] for logits in out.router_logits]
        chosen.append(layers)
    return [torch.cat(per_layer) for per_layer in zip(*chosen)]


def routing_accuracy(moe_dir: Union[str, Path], expert_data: list[list[Union[str, Path]]], *, device: str = "cpu",
                     batch_size: int = 8) -> RoutingReport:
    """``expert_data[e]``: task files of expert e's skill (held-out items, for an honest figure)."""
    from mergesmith.evaluate import load_tasks
    from mergesmith.evaluate.model import load_model
    from mergesmith.moe.train import training_texts

    lm = load_model(str(moe_dir), device=device, dtype=torch.float32)
    hits, tokens = [], []
    for e, files in enumerate(expert_data):
        per_layer = expert_top1(lm, training_texts(load_tasks(files)), batch_size)
        hits.append(torch.stack([(layer == e).sum() for layer in per_layer]))
        tokens.append(per_layer[0].numel())
    return RoutingReport(torch.stack(hits), torch.tensor(tokens))
