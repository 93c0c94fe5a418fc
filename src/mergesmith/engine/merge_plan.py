"""What a merge plan is, and what streaming it costs.

A ``MergePlan`` holds the opened models, every output tensor (``TensorPlan``) with its
inputs (model and tensor name), its resolved parameters and its layer position, and the
output's config. It is plain data: ``plan.py`` builds it, ``stream.py`` executes it, and
search and learning read it. The statistics a data-aware method reads are
referred to through interfaces the engine defines here (``StatisticRef``,
``Statistics``) and ``calibrate`` implements; the engine never imports it.

A tensor whose inputs exceed the chunk budget (``MergeOptions.chunk_bytes``, 64 MiB)
is merged in blocks of rows when the method declares its result row-separable for
it (``MethodSpec.row_separable``: each output row depends only on the same rows of
the inputs, as for a weighted sum): each block is read (only its rows' pages),
merged and written to its rows of the output, so such a tensor is never whole in
memory, neither its inputs nor its output (``row_spans``). Peak memory is about

    (inputs of the largest tensor or row block, in the compute dtype) x (1 + method workspace)
    + prefetch budget + 2 x the largest output tensor or row block

which ``MergePlan.describe`` prints as the predicted peak. It does not grow with
the model's size, only with its largest tensor the method must see whole (for
entry-wise methods, the largest that is not merged in row blocks) and the number
of inputs. Methods that read calibration statistics get them through the same
reader, beside the weights; the bound then adds, per tensor or row block, its
inputs' statistics three times (as read, and a method's sums). Row blocks apply to
them too: a block reads its rows of each statistic shaped like the tensor (Fisher's
diagonal) and every scalar one whole (Fisher's whole-model norm); a statistic of
another shape (RegMean's Gram) keeps its tensor whole.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Protocol

import torch

from mergesmith.checkpoint.layout import is_vocab_tensor
from mergesmith.checkpoint.reader import dtype_name
from mergesmith.engine.layout import input_name
from mergesmith.engine.models import ModelInfo
from mergesmith.engine.options import MergeOptions
from mergesmith.recipe import Recipe
from mergesmith.units import human_bytes
from mergesmith.vocab.union import RowMap, VocabularyPlan

# Rows lo:hi (first axis) of an output tensor merged in row blocks; None: the whole tensor.
Span = Optional[tuple[int, int]]


# ----------------------------------------------------------------------------- statistics, as the plan holds them


class StatisticRef(Protocol):
    """Where one statistic of one input tensor lies (``calibrate.StatRef``): its shape, or an
    inline scalar ``value``, and how to read it."""

    shape: tuple[int, ...]
    value: Optional[float]

    @property
    def nbytes(self) -> int: ...

    def read(self, rows: Span = None) -> torch.Tensor:
        """The statistic as stored; ``rows``: only rows ``lo:hi`` of its first axis."""


class Statistics(Protocol):
    """A plan's calibration statistics (``calibrate.StatsPlan``): what merging asks of them."""

    def missing(self) -> list:
        """What is not cached yet (empty: nothing to compute before merging)."""

    def compute(self, device: str, progress: bool, plan: "MergePlan") -> None:
        """Compute and cache what is missing, for ``plan``'s inputs."""

    def attach(self, plan: "MergePlan") -> None:
        """Record in every tensor of ``plan`` which statistics each of its inputs has."""

    def describe(self) -> list[str]:
        """Lines for ``MergePlan.describe``."""


# ----------------------------------------------------------------------------- the plan


@dataclass
class InputRef:
    model: int  # index into MergePlan.models
    name: str
    rows: Optional[int] = None  # vocabulary rows to keep or pad to (vocab tensors only)


@dataclass
class TensorPlan:
    name: str
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    inputs: list[InputRef]
    base_index: Optional[int]
    params: dict[str, Any]
    model_params: list[dict[str, Any]]
    t: float
    seed: int
    # Statistics of each input (kind -> where it lies), for methods that read them.
    stats: Optional[list[dict[str, StatisticRef]]] = None
    # A vocabulary tensor of a recipe with a tokenizer: each input's rows gathered onto the output's.
    vocab: Optional[RowMap] = None

    def input_bytes(self, plan: "MergePlan") -> int:
        return sum(plan.models[i.model].checkpoint.infos[i.name].nbytes for i in self.inputs)

    def row_shaped(self, ref: StatisticRef) -> bool:
        """Whether the statistic ``ref`` is shaped like this tensor, entry for
        entry (a Fisher diagonal): a row block then reads only its rows of it."""
        return ref.value is None and tuple(ref.shape) == tuple(self.shape)

    def stats_bytes(self, rows: Span = None) -> int:
        """The statistics' bytes as read for the whole tensor, or for rows ``lo:hi`` of it (their rows
        of the row-shaped statistics, every other statistic whole)."""
        total = 0
        for refs in self.stats or []:
            for ref in refs.values():
                part = rows is not None and self.row_shaped(ref)
                total += ref.nbytes * (rows[1] - rows[0]) // self.shape[0] if part else ref.nbytes
        return total


@dataclass
class MergePlan:
    recipe: Recipe
    models: list[ModelInfo]
    reference: int  # the model whose config, layout and tokenizer the output takes
    tensors: list[TensorPlan]
    out_config: dict[str, Any]
    compute_dtype: torch.dtype
    notes: list[str] = field(default_factory=list)
    stats: Optional[Statistics] = None  # the calibration statistics, when the method needs them
    vocabulary: Optional[VocabularyPlan] = None  # the output's tokenizer and rows, for a recipe with one

    @property
    def bytes_to_read(self) -> int:
        return sum(t.input_bytes(self) for t in self.tensors)

    @property
    def bytes_to_write(self) -> int:
        return sum(numel(t.shape) * itemsize(t.out_dtype) for t in self.tensors)

    def predicted_peak_bytes(self, options: MergeOptions) -> int:
        """The bound in the module docstring, walked along the plan's order.

        While tensor (or row block) i is merged (its inputs plus a method workspace of as
        many tensors again, plus two), the reader holds the next one's inputs, or up to the
        prefetch budget if that is more. Excludes the Python/torch runtime itself (about 0.3 GiB).
        """
        size = itemsize(self.compute_dtype)
        units = [(t, span, span_numel(t, span))
                 for t in self.tensors for span in row_spans(self, t, options.chunk_bytes)]
        loads = [load_bytes(self, t, span) for t, span, _ in units]
        worst = 0
        for i, (t, span, count) in enumerate(units):
            # Statistics: the inputs' as read, and as much again for a method's sums (RegMean's ΣG̃, in
            # float64; Fisher's numerator, denominator and work tensor, in float64).
            slots = 2 * len(t.inputs) + 2 + self.recipe.method.workspace_per_input * len(t.inputs)
            compute = int(slots * count * size) + 3 * t.stats_bytes(span)
            ahead = max(options.prefetch_bytes, loads[i + 1] if i + 1 < len(loads) else 0)
            worst = max(worst, compute + ahead)
        biggest_out = max((count * itemsize(t.out_dtype) for t, _, count in units), default=0)
        return worst + 2 * biggest_out

    def describe(self, options: MergeOptions, full: bool = True) -> str:
        lines = []
        if full:
            lines.append(f"{'output tensor':60s} {'shape':>16s}  t     inputs")
            for t in self.tensors:
                ins = ", ".join(f"{self.models[i.model].ref}:{i.name}" + (f"[rows->{i.rows}]" if i.rows else "")
                                + ("[rows by token]" if t.vocab is not None else "") for i in t.inputs)
                lines.append(f"{t.name:60s} {str(list(t.shape)):>16s}  {t.t:.2f}  {ins}")
            lines.append("")
        m = self.recipe.method
        lines += [
            f"method:          {m.name}" + (f" (stochastic, random_seed {self._seed(options)})" if m.stochastic else ""),
            f"models:          {', '.join(mi.ref for mi in self.models)}",
            f"output tensors:  {len(self.tensors)}; layers: {self.out_config.get('num_hidden_layers', '?')}",
            f"compute dtype:   {dtype_name(self.compute_dtype)}; output dtype: "
            f"{', '.join(sorted({dtype_name(t.out_dtype) for t in self.tensors}))}",
            f"bytes to read:   {human_bytes(self.bytes_to_read)}",
            f"bytes to write:  {human_bytes(self.bytes_to_write)}",
            f"predicted peak memory: {human_bytes(self.predicted_peak_bytes(options))} "
            "(a tensor's inputs and method workspace, the next tensor's inputs or "
            f"{human_bytes(options.prefetch_bytes)} read ahead, 2 outputs in flight; plus the runtime)",
        ]
        blocked = [t for t in self.tensors if row_spans(self, t, options.chunk_bytes) != [None]]
        if blocked:
            lines.append(f"row blocks:      {len(blocked)} tensors merged in blocks of rows of about "
                         f"{human_bytes(options.chunk_bytes)} of inputs (e.g. {blocked[0].name})")
        if self.stats is not None:
            lines += self.stats.describe()
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def _seed(self, options: MergeOptions) -> int:
        return options.random_seed if options.random_seed is not None else self.recipe.random_seed


@dataclass
class MergeResult:
    out_dir: Optional[Path]
    plan: MergePlan
    seconds: float = 0.0
    tensors_written: int = 0


# ----------------------------------------------------------------------------- costs


def row_spans(plan: MergePlan, task: TensorPlan, chunk_bytes: int) -> list[Span]:
    """The row blocks ``task`` is merged in: ``[None]`` (whole) unless every condition holds:

    the method declares its result row-separable for this tensor (``MethodSpec.row_separable``)
    and draws no random numbers (a generator's stream runs over the whole tensor); the math runs
    in float32 or float64 (torch's CPU kernels compute a 16-bit float op in float32 in their
    vectorized body but round after each step in its scalar tail, so where a block ends would
    change the last bit); the tensor is a float tensor of at least two rows; each of its
    calibration statistics is shaped like it (a Fisher diagonal: a block reads its rows of it) or
    is a scalar (a Fisher's whole-model norm: read with every block), never of another shape (a
    Gram matrix, a per-column coefficient); every input (and the reference model, which pads
    short vocabularies) reads rows without computing the whole tensor (not a LoRA-adapted one);
    and its inputs and statistics exceed ``chunk_bytes`` (0: never). Blocks hold about
    ``chunk_bytes`` of inputs and statistics each, at least one row.
    """
    method = plan.recipe.method
    if (chunk_bytes <= 0 or method.row_separable is None or method.stochastic
            or plan.compute_dtype not in (torch.float32, torch.float64) or len(task.shape) == 0
            or task.shape[0] < 2):
        return [None]
    if any(not task.row_shaped(ref) and ref.value is None and tuple(ref.shape) != ()
           for refs in task.stats or [] for ref in refs.values()):
        return [None]
    total = load_bytes(plan, task)
    if total <= chunk_bytes:
        return [None]
    first = task.inputs[0]
    if not plan.models[first.model].checkpoint.infos[first.name].dtype.is_floating_point:
        return [None]
    # An input aligned by token is gathered by index from a view of its whole stored tensor: cheap
    # exactly when reading rows is.
    readers = [(plan.models[ref.model].checkpoint, ref.name) for ref in task.inputs]
    if any(ref.rows is not None for ref in task.inputs):
        reference = plan.models[plan.reference]
        readers.append((reference.checkpoint, reference_name(plan, task)))
    if not all(ckpt.reads_rows_cheaply(name) for ckpt, name in readers):
        return [None]
    if not method.row_separable(task.params, is_vocab_tensor(task.name), len(task.shape)):
        return [None]
    n = task.shape[0]
    rows = max(1, chunk_bytes // max(1, total // n))
    if rows >= n:
        return [None]
    return [(lo, min(lo + rows, n)) for lo in range(0, n, rows)]


def load_bytes(plan: MergePlan, task: TensorPlan, span: Span = None) -> int:
    """What reading one tensor's inputs (or a row block of them), in the compute dtype, and their
    statistics (their rows of those shaped like the tensor) holds in memory."""
    return span_numel(task, span) * itemsize(plan.compute_dtype) * len(task.inputs) + task.stats_bytes(span)


def span_numel(task: TensorPlan, span: Span) -> int:
    if span is None:
        return numel(task.shape)
    return (span[1] - span[0]) * numel(task.shape[1:])


def reference_name(plan: MergePlan, task: TensorPlan) -> str:
    """The reference model's tensor that pads ``task``'s short vocabularies."""
    ref = plan.models[plan.reference]
    return task.name if task.name in ref.checkpoint else input_name(ref, task.name)


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
