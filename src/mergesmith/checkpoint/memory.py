"""Write merged tensors into a resident model instead of a checkpoint.

The in-memory counterpart of ``CheckpointWriter`` (``writer.py``): the same
``write(name, tensor)`` call (and ``row=`` for a block of rows), but the tensor is copied into the parameter (or
persistent buffer) of that name in a live ``torch.nn.Module``, typically a
``transformers`` model built once and reused for every candidate of a search.
A candidate then costs the merge math and the evaluation, not a write to disk
and a reload.

The copy converts to the parameter's dtype with ``Tensor.copy_``, the same
rounding as loading a written checkpoint into a model of that dtype, so the
resident model equals ``from_pretrained`` of the merge written to disk, bit for
bit. Tied weights (``lm_head`` sharing the token embedding) share storage, so
writing one writes both; ``finish()`` checks that every tensor of the model was
written, since a stale tensor left from the previous candidate would silently
change the score.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch

from mergesmith.errors import InputError


class ModelWriter:
    """``write(name, tensor)`` into ``model``'s state; ``finish()`` checks nothing was missed."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        # keep_vars: the Parameter objects themselves, so that copy_ writes into the live model.
        self.targets: dict[str, torch.Tensor] = dict(model.state_dict(keep_vars=True))
        self._written: set[int] = set()  # storages written since begin(), so tied names count once
        self._rows: dict[str, int] = {}  # rows written so far of tensors written in row blocks

    def begin(self) -> None:
        self._written.clear()
        self._rows.clear()

    @torch.no_grad()
    def write(self, name: str, tensor: torch.Tensor, row: Optional[int] = None) -> None:
        """Copy ``tensor`` into the model's tensor ``name`` whole, or (``row`` given) into its rows from
        ``row`` on: a block of a tensor merged in row blocks, which counts as written once all its
        rows are."""
        target = self.targets.get(name)
        if target is None:
            raise InputError(f"the merged tensor {name} has no place in the resident model "
                             f"({type(self.model).__name__}); the recipe's reference model and the "
                             "resident model's architecture differ")
        place = target.data if row is None else target.data[row:row + tensor.shape[0]]
        if tuple(place.shape) != tuple(tensor.shape):
            at = "" if row is None else f" at row {row}"
            raise InputError(f"the merged tensor {name} has shape {list(tensor.shape)}{at}, the resident model's "
                             f"{list(target.shape)}; the recipe's output config differs from the resident model's")
        place.copy_(tensor)
        if row is not None:
            self._rows[name] = self._rows.get(name, 0) + tensor.shape[0]
            if self._rows[name] < target.shape[0]:
                return
        self._written.add(target.data.untyped_storage().data_ptr())

    def missing(self) -> list[str]:
        """Tensors no ``write`` reached since ``begin()`` (a tied name written through its twin counts)."""
        return [name for name, t in self.targets.items()
                if t.data.untyped_storage().data_ptr() not in self._written]

    def finish(self) -> None:
        missing = self.missing()
        if missing:
            raise InputError(f"the merge wrote no value for {len(missing)} tensors of the resident model "
                             f"(e.g. {', '.join(missing[:3])}); they would keep a previous candidate's values")


def write_all(writer: ModelWriter, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Write a whole model's tensors into the resident model and check that none was missed."""
    writer.begin()
    for name, tensor in tensors:
        writer.write(name, tensor)
    writer.finish()
