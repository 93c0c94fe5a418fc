"""Where each output tensor comes from: its name in the output and its inputs' names, from the recipe's slices.

The output takes the reference model's layout: its tensors before the layers (token
embeddings) from the first slice's sources, each slice's layers renumbered from 0, then
its tensors after the layers (final norm, ``lm_head``) from the last slice's sources. A
layer tensor ``<prefix>.<i>.<suffix>`` of a slice takes ``<prefix>.<lo + i>.<suffix>`` of
each source whose layer range starts at ``lo``, at position ``t = i / (n - 1)`` in the
slice's ``n`` layers (gradients of parameters run along it); the others sit at ``t = 0``.
A new way to build a model (experts routed under new names, say) is another producer of
``Slot``s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional

from mergesmith.checkpoint.layout import is_pre_layer, is_skipped, split_layer_name, tied_embedding_name
from mergesmith.engine.models import ModelInfo
from mergesmith.recipe import Recipe, Slice


@dataclass
class Slot:
    """One output tensor as laid out: its name, the slice whose sources give its inputs, each
    source's tensor name, and its position ``t`` in the slice's layers."""

    name: str
    slice: Slice
    input_names: list[str]
    t: float


def lay_out(recipe: Recipe, models: list[ModelInfo], by_ref: dict[str, int], reference: ModelInfo, where: str,
            problems: list[str]) -> Iterator[Slot]:
    """Every output tensor, in model order (embeddings, layers, the rest), so that the two
    vocabulary-sized tensors are never read ahead while the other is being merged. A layer with no
    tensors is a problem, appended to ``problems`` as it is met."""
    names = [n for n in reference.checkpoint.infos if not is_skipped(n)]
    outside = [n for n in names if split_layer_name(n) is None]
    yield from _outside_layers([n for n in outside if is_pre_layer(n)], recipe.slices[0], models, by_ref)
    out_prefix = layer_prefix(names)
    out_layer = 0
    for sl in recipe.slices:
        lead = sl.sources[0]
        lead_model = models[by_ref[lead.model]]
        lo, hi = lead.layer_range
        n = hi - lo
        for i in range(n):
            suffixes = layer_suffixes(lead_model.checkpoint.infos, lo + i)
            if not suffixes:
                problems.append(f"{where}: {lead.field}: {lead.model} has no tensors for layer {lo + i}")
            for suffix, prefix in suffixes:
                input_names = [f"{layer_prefix(models[by_ref[src.model]].checkpoint.infos) or prefix}."
                               f"{src.layer_range[0] + i}.{suffix}" for src in sl.sources]
                yield Slot(f"{out_prefix or prefix}.{out_layer}.{suffix}", sl, input_names,
                           i / (n - 1) if n > 1 else 1.0)
            out_layer += 1
    yield from _outside_layers([n for n in outside if not is_pre_layer(n)], recipe.slices[-1], models, by_ref)


def output_layer_types(recipe: Recipe, models: list[ModelInfo], by_ref: dict[str, int]) -> tuple[int, list[Any]]:
    """How many layers the output has, and the ``layer_types`` of its config (each layer's from its
    slice's lead model, where that config lists them)."""
    count, types = 0, []
    for sl in recipe.slices:
        lead = sl.sources[0]
        lead_types = models[by_ref[lead.model]].config.get("layer_types")
        lo, hi = lead.layer_range
        for layer in range(lo, hi):
            if isinstance(lead_types, list) and layer < len(lead_types):
                types.append(lead_types[layer])
            count += 1
    return count, types


def _outside_layers(names: list[str], sl: Slice, models: list[ModelInfo], by_ref: dict[str, int]) -> Iterator[Slot]:
    for name in names:
        yield Slot(name, sl, [input_name(models[by_ref[s.model]], name) for s in sl.sources], 0.0)


def input_name(model: ModelInfo, name: str) -> str:
    """``name`` in ``model``; a tied model's lm_head is its token embedding."""
    if name in model.checkpoint.infos:
        return name
    if "lm_head" in name:
        tied = tied_embedding_name(model.names)
        if tied is not None:
            return tied
    return name


def layer_prefix(names: Iterable[str]) -> Optional[str]:
    """The prefix of the first layer tensor among ``names`` (``model.layers``)."""
    for n in names:
        parts = split_layer_name(n)
        if parts:
            return parts.prefix
    return None


def layer_suffixes(names: Iterable[str], index: int) -> list[tuple[str, str]]:
    """(suffix, prefix) of every tensor of layer ``index`` among ``names``, skipped buffers left out."""
    out = []
    for n in names:
        parts = split_layer_name(n)
        if parts and parts.index == index and not is_skipped(n):
            out.append((parts.suffix, parts.prefix))
    return out
