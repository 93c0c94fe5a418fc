"""Statistics from one loaded model: Gram matrices of linear-layer inputs, diagonal Fisher.

Both run in passes over the calibration data, each pass accumulating the statistics
of a chunk of tensors whose accumulators fit the memory budget, and writing that
chunk to its own safetensors file before the next pass starts. Peak memory is the
model (float32) + one chunk of accumulators (at most ``memory`` bytes, or the single
largest statistic when that alone is larger) + the activations of one batch (for
Fisher: of one sequence, with its backward pass). A budget that holds everything
means one pass.

**Gram** (RegMean): for each *input site* (the input tensor of one or more linear
layers: q, k and v read the same hidden states, as do gate and up), over every
non-padding token x of every calibration sequence,

    G = (1 / n) Σ_x x xᵀ,   n = the number of tokens,

the mean, as in RegMean's reference code and FusionBench's ``regmean`` (which divide
the running sum by the number of rows seen); ``n`` is stored beside it. The
products are taken in float32, batch by batch, and summed in float64.

**Fisher** (Matena & Raffel 2022): the diagonal of the model's Fisher information,
estimated per example as the paper does:

    F = (1 / N) Σ_n (∇_θ log p(ŷ_n | x_n))²,   ŷ_n sampled from the model itself,

the "true" Fisher, an expectation under the model's own predictive distribution,
not the empirical Fisher of dataset labels (the paper's definition, section 2). Its
code takes that expectation exactly over a classifier's classes; over a vocabulary
and a sequence that is intractable, so we draw one target per position, an unbiased
Monte Carlo estimate of the same quantity. For a causal LM an example is one
calibration prompt x_1..x_T and log p(ŷ | x) = Σ_t log p(ŷ_t | x_≤t), every
position's next token drawn from the model's softmax there (teacher forcing on the
prompt). The draws use a CPU generator seeded with ``seed + example index``, so they
do not depend on the device, the batch or the pass. One backward pass per example: squared gradients of a
batch's summed loss would not be per-example squares.

**With answers** (``calibration.include_answers``, ``data.encode_items``): the
sequences are each item's context followed by its gold answer. The Gram then sums
over the answer positions too. Fisher keeps the paper's estimator unchanged: the
gold tokens are only *inputs* (teacher forcing, as the expert saw them in
fine-tuning), and every position's target is still drawn from the model, never
the gold token. Matena & Raffel use the model's own predictive distribution, not
dataset labels (their code takes the exact expectation over the classes, or
samples them); the empirical Fisher on gold tokens is a different quantity, and
fine-tuned experts fit their gold answers, so its gradients there are small for
each expert's own data. What the answers add is the conditioning: the positions
inside and at the end of an answer, where the model's predictive distribution is
the skill's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors.torch import save_file

from mergesmith.calibrate.data import Sequence, padded_batches
from mergesmith.evaluate.model import LoadedModel

Progress = Callable[[int, int], None]  # (tokens done since the last call, passes in all)


@dataclass
class Site:
    """One linear-layer input: the module whose hook sees it, and every weight that reads it."""

    name: str  # the first module (in forward order) that reads this input
    modules: list[str]
    width: int  # the input's feature count: the Gram is [width, width]

    @property
    def nbytes(self) -> int:
        return self.width * self.width * 8  # float64 accumulator


@dataclass
class Written:
    """What a collection wrote: tensor name -> (file, key), plus per-key extras for the index."""

    tensors: dict[str, tuple[str, str]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    sum_of_squares: float = 0.0  # Fisher: Σ F², for the whole-model norm
    passes: int = 0


def chunks(sizes: list[int], budget: int) -> list[list[int]]:
    """Consecutive index groups whose sizes sum to at most ``budget`` (a lone larger item gets its own)."""
    out: list[list[int]] = []
    total = 0
    for i, size in enumerate(sizes):
        if out and total + size <= budget:
            out[-1].append(i)
            total += size
        else:
            out.append([i])
            total = size
    return out


def linear_modules(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """Every linear layer whose weight is the model's own (a head tied to the embeddings is left out:
    its weight is merged as an embedding)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = embeddings.weight if embeddings is not None else None
    return {name: m for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and m.weight is not tied}


def find_sites(lm: LoadedModel, probe: Sequence) -> list[Site]:
    """Group the linear layers by the tensor they read, found by running one short probe.

    Two layers share a site when their forward hooks see the very same input tensor
    (same storage, shape and strides), as q/k/v and gate/up do in every Hugging Face
    decoder; no architecture is named.
    """
    modules = linear_modules(lm.model)
    seen: dict[tuple, Site] = {}
    order: list[Site] = []
    handles = []
    held: list[torch.Tensor] = []  # kept alive so that no later input can reuse a seen one's memory

    def hook_for(name: str):
        def hook(module, args):
            x = args[0]
            held.append(x)
            key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()))
            if key in seen:
                seen[key].modules.append(name)
            else:
                seen[key] = Site(name, [name], x.shape[-1])
                order.append(seen[key])
        return hook

    for name, module in modules.items():
        handles.append(module.register_forward_pre_hook(hook_for(name)))
    try:
        ids = torch.tensor([probe.ids[:8]])
        with torch.no_grad():
            lm.forward(ids, torch.ones_like(ids), torch.arange(ids.shape[1]).unsqueeze(0))
    finally:
        for h in handles:
            h.remove()
    return order


def collect_grams(lm: LoadedModel, sequences: list[Sequence], batch_size: int, memory: int, out_dir: Path,
                  progress: Optional[Progress] = None) -> Written:
    """Write the mean input Gram matrix of every linear-layer site to ``out_dir/gram-*.safetensors``."""
    sites = find_sites(lm, sequences[0])
    modules = dict(lm.model.named_modules())
    written = Written()
    groups = chunks([s.nbytes for s in sites], memory)
    written.passes = len(groups)
    for number, group in enumerate(groups):
        chunk = [sites[i] for i in group]
        sums = {s.name: torch.zeros(s.width, s.width, dtype=torch.float64, device=lm.device) for s in chunk}
        counts = {s.name: 0 for s in chunk}
        keep: dict[str, torch.Tensor] = {}  # the current batch's non-padding positions

        def hook_for(name: str):
            def hook(module, args):
                x = args[0].detach()[keep["mask"]].float()
                sums[name] += (x.T @ x).double()
                counts[name] += x.shape[0]
            return hook

        handles = [modules[s.name].register_forward_pre_hook(hook_for(s.name)) for s in chunk]
        try:
            with torch.no_grad():
                for ids, mask, positions in padded_batches(lm, sequences, batch_size):
                    keep["mask"] = mask.bool().to(lm.device)
                    lm.forward(ids, mask, positions)  # every position: lm_head's input too
                    if progress:
                        progress(int(mask.sum()), len(groups))
        finally:
            for h in handles:
                h.remove()
        file = f"gram-{number:05d}.safetensors"
        tensors = {s.name: (sums.pop(s.name) / max(counts[s.name], 1)).float().cpu() for s in chunk}
        save_file(tensors, str(out_dir / file))
        del tensors
        for site in chunk:
            written.counts[site.name] = counts[site.name]
            for module in site.modules:
                written.tensors[f"{module}.weight"] = (file, site.name)
    return written


def sample_targets(logits: torch.Tensor, seed: int) -> torch.Tensor:
    """One next token per position, drawn from the model's softmax with a seeded CPU generator."""
    probs = torch.softmax(logits.detach().float().cpu(), dim=-1)
    generator = torch.Generator().manual_seed(seed)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def sampled_log_likelihood(lm: LoadedModel, seq: Sequence, seed: int) -> torch.Tensor:
    """log p(ŷ | x) = Σ_t log p(ŷ_t | x_≤t), with ŷ drawn by ``sample_targets``."""
    ids = torch.tensor([seq.ids])
    logits = lm.forward(ids, torch.ones_like(ids), torch.arange(ids.shape[1]).unsqueeze(0)).logits[0].float()
    targets = sample_targets(logits, seed + seq.index).to(logits.device)
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).sum()


def collect_fisher(lm: LoadedModel, sequences: list[Sequence], seed: int, memory: int, out_dir: Path,
                   progress: Optional[Progress] = None) -> Written:
    """Write the diagonal Fisher of every parameter to ``out_dir/fisher-*.safetensors``."""
    params = dict(lm.model.named_parameters())  # tied parameters appear once, under their first name
    names = list(params)
    # A chunk holds its gradients and its float32 accumulators: twice the parameters' size.
    groups = chunks([2 * params[n].numel() * 4 for n in names], memory)
    written = Written(passes=len(groups))
    flags = {n: p.requires_grad for n, p in params.items()}
    try:
        for number, group in enumerate(groups):
            chunk = [names[i] for i in group]
            for name, p in params.items():
                p.requires_grad_(name in chunk)
            sums = {n: torch.zeros_like(params[n], dtype=torch.float32) for n in chunk}
            for seq in sequences:
                lm.model.zero_grad(set_to_none=True)
                sampled_log_likelihood(lm, seq, seed).backward()
                for n in chunk:
                    if params[n].grad is not None:
                        sums[n] += params[n].grad.float() ** 2
                if progress:
                    progress(len(seq.ids), len(groups))
            lm.model.zero_grad(set_to_none=True)
            file = f"fisher-{number:05d}.safetensors"
            tensors = {}
            for n in chunk:
                fisher = (sums.pop(n) / len(sequences)).cpu()
                written.sum_of_squares += float((fisher.double() ** 2).sum())
                tensors[n] = fisher
                written.tensors[n] = (file, n)
            save_file(tensors, str(out_dir / file))
            del tensors
    finally:
        for name, p in params.items():
            p.requires_grad_(flags[name])
    return written
