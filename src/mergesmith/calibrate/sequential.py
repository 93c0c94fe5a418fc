"""RegMean++'s statistics: each model's Grams of block l, on activations that passed the *merged* blocks below.

Nguyen et al., "RegMean++: Enhancing Effectiveness and Generalization of Regression
Mean for Model Merging" (2025, https://arxiv.org/abs/2508.03121; the authors' code: github.com/nthehai01/RegMean-plusplus). Plain RegMean
takes the Gram matrix of a linear layer's inputs from the expert alone. RegMean++
takes it where the merged model will see them: for block l and expert t,

    X_t^l = f_t^l( f*^{l-1}( ... f*^0( E*(x) ) ) ),   x from expert t's calibration data,
    G_t   = (1 / n) Σ_tokens X_t^l X_t^lᵀ,  at every linear-layer input site inside block l,

where f*^k is the merged block k, f_t^l expert t's own block l (its Grams are taken
inside it, so o_proj's input is expert t's attention on the merged residual stream)
and E* the merged embedding. Block l is then merged with these Grams, and every
expert's activations are pushed through the merged block f*^l before block l + 1.
This follows FusionBench 0.2.33's ``RegMeanAlgorithmPlusPlus`` (the paper's code):
the merged embedding starts the stream, each expert's data keeps its own stream,
tensors without a Gram are averaged. FusionBench's CLIP driver merges the encoder
blocks only; for a causal LM we treat the final norm and the LM head as one more
block, so the head's Gram is expert t's final norm applied to the merged stream.

The blocks are merged by ``engine.tensor.merge_tensor``: the recipe's own method, on the
same inputs, parameters and dtypes as the streamed merge. The Grams go to the cache
as ordinary per-model statistics (kind ``gram_plusplus``), block by block, so that
``mergesmith merge`` afterwards streams the very same merged weights; the merged
blocks computed here are dropped.

Memory (``plusplus_peak_bytes``): the merged embedding and the embeddings of every
model while it is merged, then per block one expert's block (float32), the merged
block, every model's Grams of one block, and every model's calibration activations
(hidden states and the decoder layer's mask and rotary inputs, per batch), all
held on ``device``. No model is ever loaded whole: tensors are read one by one
from the checkpoints, and blocks run functionally on one weightless (meta-device)
skeleton built from the reference model's config.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from safetensors.torch import save_file
from torch.func import functional_call

from mergesmith.calibrate.collect import Written
from mergesmith.calibrate.data import encode_items, padded_batches, select_items, token_count
from mergesmith.calibrate.store import EntryWriter
from mergesmith.errors import InputError

KIND = "gram_plusplus"


@dataclass
class Skeleton:
    """A weightless copy of the reference architecture: blocks run on tensors handed in per call."""

    model: torch.nn.Module  # on the meta device; never holds a weight
    layers: torch.nn.ModuleList
    layers_prefix: str  # "model.layers"
    embed_name: str  # "model.embed_tokens.weight"
    norm: torch.nn.Module  # the final norm
    norm_prefix: str  # "model.norm"
    head_name: Optional[str]  # "lm_head", when the head has a weight of its own (not tied)


@dataclass
class Batch:
    """One calibration batch of one model, at the input of the current block."""

    hidden: torch.Tensor  # [batch, positions, hidden]: the merged model's activations
    keep: torch.Tensor  # [batch, positions] bool: non-padding positions (the Grams' tokens)
    layer_kwargs: dict[str, Any]  # the decoder layer's other inputs (mask, rotary), fixed per batch


class _Caught(Exception):
    pass


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device, their buffers for real.

    Buffers that a module computes in ``__init__`` (rotary inverse frequencies, Gemma's
    embedding scale) are not in checkpoints; building under ``torch.device("meta")``
    would lose them. Each parameter is allocated uninitialized and moved at once.
    """
    original = torch.nn.Module.register_parameter

    def register(module: torch.nn.Module, name: str, param: Optional[torch.nn.Parameter]) -> None:
        if param is not None and param.device.type != "meta":
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    torch.nn.Module.register_parameter = register
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original


def build_skeleton(path: Path, device: torch.device = torch.device("cpu")) -> Skeleton:
    """The reference model's architecture with meta-device parameters and real computed buffers on ``device``."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
    with parameters_on_meta():
        model = transformers.AutoModelForCausalLM.from_config(config)
    model.eval()
    names = {id(m): n for n, m in model.named_modules()}
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    norm = getattr(decoder, "norm", None)
    if not isinstance(layers, torch.nn.ModuleList) or norm is None:
        raise InputError(f"{path}: regmean_plusplus runs Llama-style decoders (a decoder with .layers and .norm); "
                         f"{type(model).__name__} has none")
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    head_name = names[id(head)] if head is not None and head.weight is not embed.weight else None
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = buffer.to(device)
    return Skeleton(model, layers, names[id(layers)], f"{names[id(embed)]}.weight", norm, names[id(norm)],
                    head_name)


def first_layer_inputs(skeleton: Skeleton, embedding: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                       positions: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, dict[str, Any]]:
    """Block 0's input and the decoder layer's other arguments, as the model's own forward makes them.

    The model runs on ``embedding`` up to its first layer, where a hook catches the
    call and stops it: no architecture's masking or rotary code is copied here.
    """
    caught: dict[str, Any] = {}

    def catch(module, args, kwargs):
        caught["hidden"] = args[0] if args else kwargs.pop("hidden_states")
        caught["kwargs"] = dict(kwargs)
        raise _Caught

    handle = skeleton.layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    params = {skeleton.embed_name: embedding}
    try:
        functional_call(skeleton.model, params, args=(),
                        kwargs={"input_ids": ids.to(device), "attention_mask": mask.to(device),
                                "position_ids": positions.to(device), "use_cache": False})
    except _Caught:
        pass
    finally:
        handle.remove()
    if "hidden" not in caught:
        raise RuntimeError("the model's forward never reached its first decoder layer")
    return caught["hidden"].detach(), caught["kwargs"]


def run_block(block: torch.nn.Module, params: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor:
    out = functional_call(block, params, args=(batch.hidden,), kwargs=batch.layer_kwargs)
    return (out[0] if isinstance(out, tuple) else out).detach()


class GramSums:
    """Per-site Σ x xᵀ over non-padding tokens, in float64 (as ``collect.collect_grams``)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, site: str, x: torch.Tensor, keep: torch.Tensor) -> None:
        x = x.detach()[keep].float()
        if site not in self.sums:
            self.sums[site] = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float64, device=x.device)
            self.counts[site] = 0
        self.sums[site] += (x.T @ x).double()
        self.counts[site] += x.shape[0]

    def means(self) -> dict[str, torch.Tensor]:
        """The mean Grams in float32: exactly what the cache will hold and the merge will read."""
        return {s: (self.sums[s] / max(self.counts[s], 1)).float() for s in self.sums}


def block_grams(block: torch.nn.Module, prefix: str, params: dict[str, torch.Tensor], batches: list[Batch]
                ) -> tuple[dict[str, torch.Tensor], dict[str, int], dict[str, str]]:
    """One expert's block run on every batch: (site -> mean Gram, site -> tokens, weight name -> site).

    Linear layers that read the very same input tensor (q, k, v; gate, up) share
    one site, named after the first of them, as ``collect.find_sites`` groups them.
    """
    sums = GramSums()
    site_of: dict[str, str] = {}  # module name -> its site
    seen: dict[tuple, str] = {}  # the current batch's input identities -> site
    held: list[torch.Tensor] = []  # kept alive so that no later input can reuse a seen one's memory
    current: dict[str, Any] = {}

    def hook_for(name: str):
        def hook(module, args):
            x = args[0]
            key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()))
            if name not in site_of:
                held.append(x)
                site_of[name] = seen.setdefault(key, name)
            if site_of[name] == name:
                sums.add(name, x, current["keep"])
        return hook

    handles = [m.register_forward_pre_hook(hook_for(f"{prefix}.{n}"))
               for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)]
    try:
        with torch.no_grad():
            for batch in batches:
                current["keep"] = batch.keep
                seen.clear()
                run_block(block, params, batch)
                held.clear()
    finally:
        for h in handles:
            h.remove()
    return sums.means(), sums.counts, {f"{m}.weight": s for m, s in site_of.items()}


Progress = Callable[[int], None]


def collect_plusplus(plan: Any, entries: dict[int, Any], device: str = "cpu",
                     progress: Optional[Progress] = None) -> dict[int, Path]:
    """Compute every input model's ``gram_plusplus`` statistics and write each to its cache folder.

    ``plan`` is the ``engine.MergePlan`` whose merge the statistics serve; ``entries``
    maps a plan model index to its ``ModelStats``. Returns model index -> folder.
    """
    from mergesmith.engine.tensor import merge_tensor
    from mergesmith.evaluate.model import load_model

    dev = torch.device(device)
    skeleton = build_skeleton(plan.models[plan.reference].path, dev)
    tasks = {t.name: t for t in plan.tensors}
    _check_layout(plan, skeleton, tasks)
    order = sorted(entries)
    start = time.perf_counter()

    def merged(name: str, grams: Optional[dict[int, dict[str, torch.Tensor]]] = None) -> torch.Tensor:
        task = tasks[name]
        stats = [{KIND: grams[i.model][i.name]} if grams and i.name in grams.get(i.model, {}) else {}
                 for i in task.inputs]
        return merge_tensor(plan, task, dev, stats).to(dev, torch.float32)

    def expert(model: int, names: list[str], prefix: str) -> dict[str, torch.Tensor]:
        ckpt = plan.models[model].checkpoint
        out = {n[len(prefix) + 1:]: ckpt.read(n).to(dev, torch.float32, copy=True) for n in names}
        for n in names:
            ckpt.release(n)
        return out

    # Each model's calibration batches at the input of block 0, through the merged embedding.
    embedding = merged(skeleton.embed_name)
    streams: dict[int, list[Batch]] = {}
    tokens: dict[int, int] = {}
    for i in order:
        settings = entries[i].settings
        lm = load_model(skeleton.model, tokenizer=str(plan.models[i].path), max_length=settings.max_length)
        sequences = encode_items(lm, select_items(settings), settings.max_length, settings.include_answers)
        if not sequences:
            raise InputError(f"{', '.join(settings.files)}: the calibration data gives no tokens; give prompts")
        tokens[i] = token_count(sequences)
        streams[i] = []
        with torch.no_grad():
            for ids, mask, positions in padded_batches(lm, sequences, settings.batch_size):
                hidden, kwargs = first_layer_inputs(skeleton, embedding, ids, mask, positions, dev)
                streams[i].append(Batch(hidden, mask.bool().to(dev), kwargs))
    del embedding

    writers = {i: EntryWriter(entries[i].folders[KIND]) for i in order}
    for i in order:
        entries[i].folders[KIND].parent.mkdir(parents=True, exist_ok=True)
    written = {i: Written(passes=1) for i in order}

    def save(block: int, i: int, grams: dict[str, torch.Tensor], counts: dict[str, int],
             sites: dict[str, str]) -> None:
        file = f"{KIND}-{block:05d}.safetensors"
        save_file({s: g.cpu() for s, g in grams.items()}, str(writers[i].tmp / file))
        written[i].counts.update(counts)
        written[i].tensors.update({w: (file, s) for w, s in sites.items()})

    try:
        for l, block in enumerate(skeleton.layers):
            prefix = f"{skeleton.layers_prefix}.{l}"
            names = [f"{prefix}.{n}" for n, _ in block.named_parameters()]
            grams: dict[int, dict[str, torch.Tensor]] = {}
            for i in order:
                means, counts, sites = block_grams(block, prefix, expert(i, names, prefix), streams[i])
                save(l, i, means, counts, sites)
                grams[i] = {w: means[s] for w, s in sites.items()}
                if progress:
                    progress(1)
            if l + 1 < len(skeleton.layers) or skeleton.head_name:
                merged_block = {n[len(prefix) + 1:]: merged(n, grams) for n in names}
                with torch.no_grad():
                    for i in order:
                        for batch in streams[i]:
                            batch.hidden = run_block(block, merged_block, batch)
                del merged_block
            del grams
        if skeleton.head_name:  # the final norm and the head: one more block
            norm_names = [f"{skeleton.norm_prefix}.{n}" for n, _ in skeleton.norm.named_parameters()]
            for i in order:
                params = expert(i, norm_names, skeleton.norm_prefix)
                sums = GramSums()
                with torch.no_grad():
                    for batch in streams[i]:
                        sums.add(skeleton.head_name, functional_call(skeleton.norm, params, (batch.hidden,)),
                                 batch.keep)
                save(len(skeleton.layers), i, sums.means(), sums.counts,
                     {f"{skeleton.head_name}.weight": skeleton.head_name})
                if progress:
                    progress(1)
        elif progress:  # a tied head has no Gram: its block is done
            progress(len(order))
        seconds = round(time.perf_counter() - start, 3)
        done = {}
        for i in order:
            s = entries[i].settings
            index = {"kind": KIND, "model": str(plan.models[i].path), "tensors": written[i].tensors,
                     "counts": written[i].counts, "sequences": sum(b.hidden.shape[0] for b in streams[i]),
                     "tokens": tokens[i], "passes": 1,
                     "merged_with": [str(plan.models[j].path) for j in order],
                     "settings": {"files": list(s.files), "samples": s.samples, "max_length": s.max_length,
                                  "seed": s.seed, "include_answers": s.include_answers},
                     "seconds": seconds}
            done[i] = writers[i].commit(index)
        return done
    except BaseException:
        for w in writers.values():
            w.abort()
        raise


def blocks_to_run(plan: Any) -> int:
    """Expert block runs a collection makes (for a progress bar): every layer and the head, per model."""
    layers = int((plan.models[plan.reference].config.get("text_config") or plan.models[plan.reference].config)
                 .get("num_hidden_layers", 0))
    return layers + 1


def _check_layout(plan: Any, skeleton: Skeleton, tasks: dict[str, Any]) -> None:
    """RegMean++ merges layer l of every model into layer l: each block tensor's inputs carry its own name."""
    problems = []
    names = [skeleton.embed_name] + [n for n, _ in skeleton.model.named_parameters()
                                     if n.startswith(skeleton.layers_prefix + ".")]
    if skeleton.head_name:
        names.append(f"{skeleton.head_name}.weight")
    for name in names:
        task = tasks.get(name)
        if task is None:
            problems.append(f"{plan.recipe.source_name}: regmean_plusplus: the merge plans no tensor {name}; "
                            "it needs every block of the reference architecture, in order")
        elif name != skeleton.embed_name and any(i.name != name for i in task.inputs):
            moved = ", ".join(f"{plan.models[i.model].ref}:{i.name}" for i in task.inputs if i.name != name)
            problems.append(f"{plan.recipe.source_name}: regmean_plusplus merges layer l of every model into "
                            f"layer l, but {name} reads {moved}; use a models: recipe without layer slices")
    if problems:
        raise InputError(problems[:5] + ([f"... and {len(problems) - 5} more"] if len(problems) > 5 else []))


def plusplus_peak_bytes(models: list[Any]) -> int:
    """About the most memory ``collect_plusplus`` holds (the module docstring's terms), float32.

    max(every model's embedding + the merged one,
        2 blocks + every model's Grams of one block + one model's float64 sums of them)
    + every model's activations: per token the hidden state and the rotary cos/sin,
      plus per batch the [batch, 1, length, length] attention mask.
    """
    entries = [m for m in models if m is not None]
    if not entries:
        return 0
    cfg = entries[0].config.get("text_config") or entries[0].config
    h = int(cfg.get("hidden_size", 0))
    i = int(cfg.get("intermediate_size", 4 * h))
    vocab = int(cfg.get("vocab_size", 0))
    heads = int(cfg.get("num_attention_heads", 1) or 1)
    kv = int(cfg.get("num_key_value_heads", heads) or heads)
    head_dim = int(cfg.get("head_dim", h // heads) or h // heads)
    n = len(entries)
    block = h * heads * head_dim * 2 + 2 * h * kv * head_dim + 3 * h * i + 2 * h
    grams = 2 * h * h + (heads * head_dim) ** 2 + i * i
    stage = max((n + 1) * vocab * h, 2 * block + (n + 2) * grams)
    activations = 0
    for e in entries:
        s = e.settings
        tokens = s.samples * s.max_length
        activations += tokens * (h + 2 * head_dim) + -(-s.samples // s.batch_size) * s.batch_size * s.max_length ** 2
    return 4 * (stage + activations)
