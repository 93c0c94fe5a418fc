"""One planned tensor: read its inputs, run the method, check the result.

The streaming executor (``stream.py``) runs these on every tensor and row block; rooms
above the engine that merge tensors themselves (``calibrate.sequential``, search's
resident model) call ``merge_tensor`` and ``load_inputs``, so that what they compute is
what ``mergesmith merge`` writes. A NaN or an infinity in an input or a result stops
the merge (``InputError``) unless ``allow_nonfinite`` carries it through with a warning.
"""

from __future__ import annotations

import warnings
from typing import Optional, Union

import torch

from mergesmith.checkpoint.layout import is_vocab_tensor
from mergesmith.checkpoint.reader import dtype_name
from mergesmith.engine.merge_plan import MergePlan, Span, TensorPlan, reference_name
from mergesmith.errors import InputError
from mergesmith.methods import TensorGroup


def load_inputs(plan: MergePlan, task: TensorPlan, device: torch.device, allow_nonfinite: bool = False,
                rows: Span = None) -> tuple[list[torch.Tensor], Optional[list[dict[str, torch.Tensor]]]]:
    """The input tensors in the compute dtype, and their calibration statistics (as stored) if planned.

    ``rows``: only rows ``lo:hi`` of each input (of the output's rows: a vocabulary padded from
    the reference model is padded in those rows alone), and of each statistic shaped like the
    tensor (``TensorPlan.row_shaped``; the others whole), for a tensor merged in row blocks.
    A vocabulary tensor aligned by token (``task.vocab``) gathers those rows by index.
    """
    if task.vocab is not None:
        out = _aligned_inputs(plan, task, device, allow_nonfinite, rows)
    else:
        out = _inputs(plan, task, device, allow_nonfinite, rows)
    if task.stats is None:
        return out, None
    return out, [{kind: ref.read(rows if task.row_shaped(ref) else None).to(device) for kind, ref in refs.items()}
                 for refs in task.stats]


def _inputs(plan: MergePlan, task: TensorPlan, device: torch.device, allow_nonfinite: bool,
            rows: Span) -> list[torch.Tensor]:
    out = []
    for ref in task.inputs:
        model = plan.models[ref.model]
        ckpt = model.checkpoint
        if rows is None:
            stored = ckpt.read(ref.name)
            if ref.rows is not None and stored.shape[0] > ref.rows:
                stored = stored[: ref.rows]
            lo, hi = 0, ref.rows
        else:
            lo, hi = rows
            have = ckpt.infos[ref.name].shape[0]  # a shorter vocabulary than the output's stores fewer
            stored = ckpt.read_rows(ref.name, min(lo, have), min(hi, have))
        if device.type == "cpu":
            x = stored.to(dtype=plan.compute_dtype, copy=True)
        else:
            x = stored.to(device).to(plan.compute_dtype)
        ckpt.release(ref.name)
        counts = nonfinite_counts(x)
        if counts:
            _nonfinite_found(f"{model.ref}: tensor {ref.name} holds {_counts_text(counts)}{_rows_text(rows)}; "
                             "the checkpoint is damaged: re-download or re-save it", allow_nonfinite)
        if ref.rows is not None and x.shape[0] < hi - lo:
            filler = _reference_rows(plan, task, lo + x.shape[0], hi).to(x)
            x = torch.cat([x, filler])
        out.append(x)
    return out


def _aligned_inputs(plan: MergePlan, task: TensorPlan, device: torch.device, allow_nonfinite: bool,
                    rows: Span) -> list[torch.Tensor]:
    """Each input's rows laid on the output's vocabulary (``vocab.union.RowMap``): its own rows and
    the filled ones gathered by index from the stored tensors, which are views of their files, so
    only the rows gathered are read (a filled row may come from another input)."""
    assert task.vocab is not None
    lo, hi = rows if rows is not None else (0, task.shape[0])
    stored = [plan.models[ref.model].checkpoint.read(ref.name) for ref in task.inputs]
    chunk = hi - lo if rows is not None else None
    out = []
    for k, ref in enumerate(task.inputs):
        x = task.vocab.block(k, stored, lo, hi, plan.compute_dtype, chunk)
        counts = nonfinite_counts(x)
        if counts:
            model = plan.models[ref.model]
            _nonfinite_found(f"{model.ref}: tensor {ref.name} holds {_counts_text(counts)}{_rows_text(rows)} (as "
                             "aligned to the output's vocabulary); the checkpoint is damaged: re-download or "
                             "re-save it", allow_nonfinite)
        out.append(x if device.type == "cpu" else x.to(device))
    for ref in task.inputs:
        plan.models[ref.model].checkpoint.release(ref.name)
    return out


def merge_tensor(plan: MergePlan, task: TensorPlan, device: Union[str, torch.device] = "cpu",
                 stats: Optional[list[dict[str, torch.Tensor]]] = None,
                 inputs: Optional[list[torch.Tensor]] = None) -> torch.Tensor:
    """One planned tensor, read and merged exactly as the streaming executor does it (output dtype, CPU).

    For collectors whose statistics depend on merged tensors (RegMean++'s Grams of
    block l are taken on the activations of the merged blocks below it): they pass
    the statistics they hold in memory, and get the very tensor the later streamed
    merge will write from the same statistics once cached.

    ``inputs``: the task's input tensors as ``load_inputs`` returns them, for callers that
    keep inputs in memory across merges (search); the method may overwrite them in place,
    so pass copies of anything kept.
    """
    device = torch.device(device)
    tensors = inputs if inputs is not None else load_inputs(plan, task, device)[0]
    return run_method(plan, task, tensors, device, False, stats)


def run_method(plan: MergePlan, task: TensorPlan, tensors: list[torch.Tensor], device: torch.device,
               allow_nonfinite: bool = False, stats: Optional[list[dict[str, torch.Tensor]]] = None,
               rows: Span = None) -> torch.Tensor:
    """The method's result for ``task`` (or rows ``lo:hi`` of it), in the output dtype on the CPU,
    checked for shape and non-finite values."""
    method = plan.recipe.method
    if not plan.models[task.inputs[0].model].checkpoint.infos[task.inputs[0].name].dtype.is_floating_point:
        return tensors[0].to(task.out_dtype, copy=True).cpu()
    generator = None
    if method.stochastic:
        generator = torch.Generator(device=device).manual_seed(task.seed)
    group = TensorGroup(task.name, tensors, task.params, task.model_params, task.base_index, generator, task.t,
                        disposable=True, vocab=is_vocab_tensor(task.name), stats=stats)
    out = method.fn(group)
    expected = task.shape if rows is None else (rows[1] - rows[0], *task.shape[1:])
    if tuple(out.shape) != expected:
        raise RuntimeError(f"{task.name}: method {method.name} returned shape {list(out.shape)}, "
                           f"expected {list(expected)}")
    result = out.to(device="cpu", dtype=task.out_dtype)
    counts = nonfinite_counts(result)
    if counts:
        overflow = nonfinite_counts(out) is None
        cause = (f"values beyond the range of {dtype_name(task.out_dtype)}; choose a wider out_dtype"
                 if overflow else "e.g. a division by a zero norm; check the method's parameters")
        _nonfinite_found(f"{task.name}: method {method.name} produced {_counts_text(counts)}{_rows_text(rows)} "
                         f"({cause})", allow_nonfinite)
    return result


def nonfinite_counts(x: torch.Tensor) -> Optional[tuple[int, int]]:
    """(NaN count, Inf count) of ``x``, or None when every value is finite.

    A finite sum proves every term finite (a NaN or an Inf anywhere makes it NaN or
    infinite), so the common case costs one reduction and no temporary; only a
    non-finite sum, which a huge finite tensor could also overflow to, gets counted.
    """
    if not x.dtype.is_floating_point or x.numel() == 0:
        return None
    if torch.isfinite(x.sum(dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)):
        return None
    nan, inf = int(torch.isnan(x).sum()), int(torch.isinf(x).sum())
    return (nan, inf) if nan or inf else None


def _counts_text(counts: tuple[int, int]) -> str:
    return f"{counts[0]} NaN and {counts[1]} infinite values"


def _rows_text(rows: Span) -> str:
    """Where in a tensor merged in row blocks the block just checked lies (a block is checked, and
    refused, on its own: the counts are that block's)."""
    return "" if rows is None else f" in rows {rows[0]}..{rows[1] - 1}"


def _nonfinite_found(message: str, allow: bool) -> None:
    if allow:
        warnings.warn(message.split("; ")[0] + "; carried through (allow_nonfinite)", stacklevel=2)
        return
    raise InputError(message + "; or pass --allow-nonfinite to carry non-finite values through")


def _reference_rows(plan: MergePlan, task: TensorPlan, lo: int, hi: int) -> torch.Tensor:
    ref = plan.models[plan.reference]
    name = reference_name(plan, task)
    rows = ref.checkpoint.read_rows(name, lo, hi).to(plan.compute_dtype, copy=True)
    ref.checkpoint.release(name)
    return rows
