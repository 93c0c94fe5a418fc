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

from mergesmith.calibrate.data import Sequence, padded_batches
from mergesmith.checkpoint.writer import OutputTensor, write_safetensors
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


def chunks(sizes: list[int], budget: int, transients: Optional[list[int]] = None) -> list[list[int]]:
    """Consecutive index groups whose sizes sum to at most ``budget`` (a lone larger item gets its own).

    ``transients``: per item, memory it needs for a moment beside the whole group (Fisher: a
    gradient as large as the parameter, one at a time); the group's largest counts too.
    """
    extra = transients or [0] * len(sizes)
    out: list[list[int]] = []
    total = largest = 0
    for i, size in enumerate(sizes):
        if out and total + size + max(largest, extra[i]) <= budget:
            out[-1].append(i)
            total, largest = total + size, max(largest, extra[i])
        else:
            out.append([i])
            total, largest = size, extra[i]
    return out


def linear_modules(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """Every linear layer whose weight is the model's own (a head tied to the embeddings is left out:
    its weight is merged as an embedding)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = embeddings.weight if embeddings is not None else None
    return {name: m for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and m.weight is not tied}


def find_sites(lm: LoadedModel, probe: Sequence) -> tuple[list[Site], bool]:
    """Group the linear layers by the tensor they read, found by running one short probe.

    Two layers share a site when their forward hooks see the very same input tensor
    (same storage, shape and strides), as q/k/v and gate/up do in every Hugging Face
    decoder; no architecture is named. The flag says whether every linear layer ran
    exactly once in the probe: only then may a pass stop the forward as soon as it
    has seen each of its sites (a layer run twice, e.g. shared across depth, must be
    seen every time).
    """
    modules = linear_modules(lm.model)
    seen: dict[tuple, Site] = {}
    order: list[Site] = []
    calls = {name: 0 for name in modules}
    handles = []
    held: list[torch.Tensor] = []  # kept alive so that no later input can reuse a seen one's memory

    def hook_for(name: str):
        def hook(module, args):
            x = args[0]
            held.append(x)
            calls[name] += 1
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
    return order, all(n == 1 for n in calls.values())


class _PassDone(Exception):
    """Raised by the last of a pass's hooks to run: nothing the forward computes after it is needed."""


def collect_grams(lm: LoadedModel, sequences: list[Sequence], batch_size: int, memory: int, out_dir: Path,
                  progress: Optional[Progress] = None) -> Written:
    """Write the mean input Gram matrix of every linear-layer site to ``out_dir/gram-*.safetensors``.

    A pass stops each forward as soon as every site of its chunk has seen the batch
    (when each linear layer runs once per forward): the layers above the chunk, and
    the vocabulary projection (``lm_head``'s site needs its input, never its output),
    are not computed. The logits of a batch, batch × length × vocab floats, are then
    never held, and a pass over the early layers costs only those layers.
    """
    sites, once = find_sites(lm, sequences[0])
    modules = dict(lm.model.named_modules())
    written = Written()
    groups = chunks([s.nbytes for s in sites], memory)
    written.passes = len(groups)
    for number, group in enumerate(groups):
        chunk = [sites[i] for i in group]
        sums = {s.name: torch.zeros(s.width, s.width, dtype=torch.float64, device=lm.device) for s in chunk}
        counts = {s.name: 0 for s in chunk}
        keep: dict[str, torch.Tensor] = {}  # the current batch's non-padding positions
        done: set[str] = set()  # the sites that have seen the current batch

        def hook_for(name: str):
            def hook(module, args):
                x = args[0].detach()[keep["mask"]].float()
                sums[name] += x.T @ x  # products in float32, summed in float64 (no float64 copy)
                counts[name] += x.shape[0]
                done.add(name)
                if once and len(done) == len(chunk):
                    raise _PassDone
            return hook

        handles = [modules[s.name].register_forward_pre_hook(hook_for(s.name)) for s in chunk]
        try:
            with torch.no_grad():
                for ids, mask, positions in padded_batches(lm, sequences, batch_size):
                    keep["mask"] = mask.bool().to(lm.device)
                    done.clear()
                    try:
                        lm.forward(ids, mask, positions)
                    except _PassDone:
                        pass
                    if progress:
                        progress(int(mask.sum()), len(groups))
        finally:
            for h in handles:
                h.remove()
        file = f"gram-{number:05d}.safetensors"
        write_safetensors(out_dir / file, [OutputTensor(s.name, torch.float32, (s.width, s.width)) for s in chunk],
                          lambda name: sums.pop(name).div_(max(counts[name], 1)).float())
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


HEAD_BLOCK_BYTES = 16 * 1024 ** 2  # rows of the output head's per-example gradient formed at once


def vocabulary_modules(model: torch.nn.Module, params: dict[str, torch.Tensor]) -> dict[str, Callable]:
    """Weight name -> ``install(sum)`` for the untied vocabulary matrices, whose squared per-example
    gradients are added to ``sum`` without a dense gradient; ``install`` returns the hook handles.

    Input embedding: the weight's gradient is, row v, the sum of the output's gradient over the
    positions holding token v (zero for ``padding_idx``, as ``nn.Embedding``'s backward makes
    it), so only the rows of the sequence's tokens are formed. Output head: the weight's
    gradient is Gᵀ X (G the gradient of the head's output, X its input, over the positions),
    formed and squared ``HEAD_BLOCK_BYTES`` of rows at a time. The same sums as autograd's dense
    gradient, up to float rounding. A weight shared by both (tied), or an embedding with options
    that change its backward (``max_norm``, ``scale_grad_by_freq``, sparse), keeps autograd's
    dense gradient.
    """
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    name_of = {id(p): n for n, p in params.items()}
    out: dict[str, Callable] = {}
    if head is not None and embed is not None and head.weight is embed.weight:
        return out
    if (isinstance(embed, torch.nn.Embedding) and id(embed.weight) in name_of and embed.max_norm is None
            and not embed.scale_grad_by_freq and not embed.sparse):
        def install_embedding(total: torch.Tensor, module: torch.nn.Embedding = embed) -> list:
            def forward_hook(mod, args, output):
                ids = args[0].reshape(-1)
                output = output.detach().requires_grad_()  # the weight has no gradient in this pass

                def on_gradient(grad: torch.Tensor) -> None:
                    tokens, where = torch.unique(ids, return_inverse=True)
                    rows = torch.zeros(len(tokens), grad.shape[-1], dtype=torch.float32, device=grad.device)
                    rows.index_add_(0, where, grad.reshape(-1, grad.shape[-1]).float())
                    if module.padding_idx is not None:
                        rows[tokens == module.padding_idx] = 0
                    total.index_add_(0, tokens, rows.mul_(rows))
                output.register_hook(on_gradient)
                return output
            return [module.register_forward_hook(forward_hook)]
        out[name_of[id(embed.weight)]] = install_embedding
    if isinstance(head, torch.nn.Linear) and id(head.weight) in name_of:
        def install_head(total: torch.Tensor, module: torch.nn.Linear = head) -> list:
            inputs: list[torch.Tensor] = []

            def pre_hook(mod, args):
                x = args[0]
                if not x.requires_grad:  # nothing below is in this pass: a gradient for the output only
                    x = x.detach().requires_grad_()
                inputs.append(x.detach())
                return (x, *args[1:])

            def forward_hook(mod, args, output):
                x = inputs.pop()

                def on_gradient(grad: torch.Tensor) -> None:
                    g = grad.reshape(-1, grad.shape[-1]).float()
                    xs = x.reshape(-1, x.shape[-1]).float()
                    step = max(1, HEAD_BLOCK_BYTES // (4 * xs.shape[1]))
                    for start in range(0, g.shape[1], step):
                        part = g[:, start:start + step].T @ xs
                        total[start:start + step].addcmul_(part, part)
                output.register_hook(on_gradient)
            return [module.register_forward_pre_hook(pre_hook), module.register_forward_hook(forward_hook)]
        out[name_of[id(head.weight)]] = install_head
    return out


def collect_fisher(lm: LoadedModel, sequences: list[Sequence], seed: int, memory: int, out_dir: Path,
                   progress: Optional[Progress] = None) -> Written:
    """Write the diagonal Fisher of every parameter to ``out_dir/fisher-*.safetensors``.

    Each gradient is squared into its accumulator the moment backward has finished
    it (a post-accumulate-grad hook) and freed there, so a pass holds one float32
    sum per parameter of its chunk (4 bytes per parameter) and one gradient at a time
    beside it, not the chunk's gradients: the sums and the chunk's largest gradient
    together fit ``memory``.

    The vocabulary matrices (an untied input embedding and output head) never get a
    dense gradient: their per-example gradients are formed from the gradient of the
    module's output (``vocabulary_modules``), the embedding's on the rows the
    sequence uses, the head's a block of rows at a time, each squared into the sum
    as it is formed. Their passes then hold the sum alone.
    """
    params = dict(lm.model.named_parameters())  # tied parameters appear once, under their first name
    names = list(params)
    vocab = vocabulary_modules(lm.model, params)
    # A pass holds its chunk's sums and, while backward runs, one dense gradient at a time.
    sizes = [params[n].numel() * 4 for n in names]
    groups = chunks(sizes, memory, [0 if n in vocab else size for n, size in zip(names, sizes)])
    written = Written(passes=len(groups))
    flags = {n: p.requires_grad for n, p in params.items()}
    sums: dict[str, torch.Tensor] = {}

    def square_into(name: str):
        def hook(param: torch.Tensor) -> None:
            grad = param.grad.float()
            sums[name].addcmul_(grad, grad)
            param.grad = None
        return hook

    handles: list = []
    try:
        for number, group in enumerate(groups):
            chunk = [names[i] for i in group]
            for name, p in params.items():
                p.requires_grad_(name in chunk and name not in vocab)
            sums.update({n: torch.zeros_like(params[n], dtype=torch.float32) for n in chunk})
            handles = [params[n].register_post_accumulate_grad_hook(square_into(n)) for n in chunk
                       if n not in vocab]
            handles += [h for n in chunk if n in vocab for h in vocab[n](sums[n])]
            for seq in sequences:
                sampled_log_likelihood(lm, seq, seed).backward()
                if progress:
                    progress(len(seq.ids), len(groups))
            for h in handles:
                h.remove()
            handles = []
            file = f"fisher-{number:05d}.safetensors"

            def mean(name: str) -> torch.Tensor:
                fisher = sums.pop(name).div_(len(sequences))
                # in float64, a million entries at a time: no float64 copy of a whole vocabulary tensor
                written.sum_of_squares += sum(float((part.double() ** 2).sum())
                                              for part in fisher.reshape(-1).split(1 << 20))
                written.tensors[name] = (file, name)
                return fisher

            write_safetensors(out_dir / file, [OutputTensor(n, torch.float32, tuple(params[n].shape)) for n in chunk],
                              mean)
    finally:
        for h in handles:
            h.remove()
        lm.model.zero_grad(set_to_none=True)
        for name, p in params.items():
            p.requires_grad_(flags[name])
    return written
