"""Plan a merge tensor by tensor, then stream it: read, merge, write, overlapped.

``plan_merge`` turns a recipe into a ``MergePlan``: every output tensor with its
inputs (model and tensor name), its resolved parameters and its layer position.
Planning reads configs and checkpoint headers only, and reports every problem it
finds at once; no weight is read before the whole plan is known to be sound.

``execute_plan`` streams the plan. A reader thread converts input tensors to the
compute dtype (zero-copy views of memory-mapped safetensors, released from
resident memory right after conversion) and prefetches ahead of the math as long
as the prefetched bytes stay under a budget; the main thread runs the method; a
writer thread writes each result into its place in the pre-laid-out shards.

A tensor whose inputs exceed the chunk budget (``MergeOptions.chunk_bytes``, 64 MiB)
is merged in blocks of rows when the method declares its result row-separable for
it (``MethodSpec.row_separable``: each output row depends only on the same rows of
the inputs, as for a weighted sum): each block is read (only its rows' pages),
merged and written to its rows of the output, so such a tensor is never whole in
memory, neither its inputs nor its output. The blocks flow through the same reader,
prefetch and writer as whole tensors, and the result equals the whole-tensor merge
bit for bit. Peak memory is about

    (inputs of the largest tensor or row block, in the compute dtype) x (1 + method workspace)
    + prefetch budget + 2 x the largest output tensor or row block

which ``MergePlan.describe`` prints as the predicted peak. It does not grow with
the model's size, only with its largest tensor the method must see whole (for
entry-wise methods, the largest that is not merged in row blocks) and the number
of inputs. Methods
that read calibration statistics (``mergesmith.calibrate``) get them through the
same reader thread, beside the weights; the bound then adds, per tensor or row
block, its inputs' statistics three times (as read, and a method's sums). Row
blocks apply to them too: a block reads its rows of each statistic shaped like
the tensor (Fisher's diagonal) and every scalar one whole (Fisher's whole-model
norm); a statistic of another shape (RegMean's Gram) keeps its tensor whole.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import sys
import time
import zlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union
import warnings

import torch
from tqdm.auto import tqdm

from mergesmith.checkpoint.config import read_config
from mergesmith.checkpoint.layout import (
    is_pre_layer, is_skipped, is_vocab_tensor, num_layers, split_layer_name, tied_embedding_name, vocab_tokens,
)
from mergesmith.checkpoint.lora import LoraCheckpoint, split_lora_ref
from mergesmith.checkpoint.reader import Checkpoint, dtype_from_name, dtype_name
from mergesmith.checkpoint.writer import CheckpointWriter, OutputTensor, remove_stale_partials
from mergesmith import malloc
from mergesmith.checks import pick_device
from mergesmith.errors import InputError, ResourceError, read_text
from mergesmith.methods import BasePolicy, TensorGroup
from mergesmith.paths import OutputLock, output_problems
from mergesmith.recipe import Recipe, Slice, load_recipe, model_refs_of, read_recipe_raw, resolve_param
from mergesmith.units import human_bytes

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")
GB = 1024 ** 3
# Rows lo:hi (first axis) of an output tensor merged in row blocks; None: the whole tensor.
Span = Optional[tuple[int, int]]


@dataclass
class MergeOptions:
    device: str = "cpu"  # cpu, cuda, cuda:N or auto
    threads: Optional[int] = None  # torch intra-op threads; None keeps torch's default
    out_shard_size: int = 5 * 10 ** 9  # bytes per output shard, as mergekit's default
    overwrite: bool = False
    vocab_mismatch: str = "resize"  # resize (with a warning) or error
    prefetch_bytes: int = 128 * 1024 ** 2  # how far the reader may run ahead (one tensor always may)
    # Inputs (in the compute dtype) above which a tensor is merged in row blocks of about this many
    # bytes, where the method allows it (MethodSpec.row_separable); 0 merges every tensor whole.
    chunk_bytes: int = 64 * 1024 ** 2
    progress: bool = True
    random_seed: Optional[int] = None  # overrides the recipe's random_seed
    # NaN/Inf in an input or output tensor stop the merge unless this carries them through (with a warning).
    allow_nonfinite: bool = False


@dataclass
class ModelInfo:
    ref: str  # as written in the recipe
    path: Path
    config: dict[str, Any]
    checkpoint: Checkpoint | LoraCheckpoint
    layers: int

    @property
    def names(self) -> set[str]:
        return set(self.checkpoint.infos)


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
    # Calibration statistics of each input (kind -> where it is cached), for methods that need them.
    stats: Optional[list[dict[str, Any]]] = None

    def input_bytes(self, plan: "MergePlan") -> int:
        return sum(plan.models[i.model].checkpoint.infos[i.name].nbytes for i in self.inputs)

    def row_shaped(self, ref: Any) -> bool:
        """Whether the statistic ``ref`` (a ``calibrate.StatRef``) is shaped like this tensor, entry for
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
    stats: Any = None  # a calibrate.StatsPlan when the method needs statistics

    @property
    def bytes_to_read(self) -> int:
        return sum(t.input_bytes(self) for t in self.tensors)

    @property
    def bytes_to_write(self) -> int:
        return sum(_numel(t.shape) * _itemsize(t.out_dtype) for t in self.tensors)

    def predicted_peak_bytes(self, options: MergeOptions) -> int:
        """The bound in the module docstring, walked along the plan's order.

        While tensor (or row block) i is merged (its inputs plus a method workspace of as
        many tensors again, plus two), the reader holds the next one's inputs, or up to the
        prefetch budget if that is more. Excludes the Python/torch runtime itself (about 0.3 GiB).
        """
        size = _itemsize(self.compute_dtype)
        units = [(t, span, _span_numel(t, span))
                 for t in self.tensors for span in row_spans(self, t, options.chunk_bytes)]
        loads = [_load_bytes(self, t, span) for t, span, _ in units]
        worst = 0
        for i, (t, span, numel) in enumerate(units):
            # Statistics: the inputs' as read, and as much again for a method's sums (RegMean's ΣG̃, in
            # float64; Fisher's numerator, denominator and work tensor, in float64).
            slots = 2 * len(t.inputs) + 2 + self.recipe.method.workspace_per_input * len(t.inputs)
            compute = int(slots * numel * size) + 3 * t.stats_bytes(span)
            ahead = max(options.prefetch_bytes, loads[i + 1] if i + 1 < len(loads) else 0)
            worst = max(worst, compute + ahead)
        biggest_out = max((numel * _itemsize(t.out_dtype) for t, _, numel in units), default=0)
        return worst + 2 * biggest_out

    def describe(self, options: MergeOptions, full: bool = True) -> str:
        lines = []
        if full:
            lines.append(f"{'output tensor':60s} {'shape':>16s}  t     inputs")
            for t in self.tensors:
                ins = ", ".join(f"{self.models[i.model].ref}:{i.name}" + (f"[rows->{i.rows}]" if i.rows else "")
                                for i in t.inputs)
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


# ----------------------------------------------------------------------------- public API


def merge(recipe: Union[str, Path, dict, Recipe], out_dir: Union[str, Path], *, dry_run: bool = False,
          options: Optional[MergeOptions] = None, **kwargs: Any) -> MergeResult:
    """Merge the models a recipe names into ``out_dir`` (a Hugging Face model folder).

    ``recipe`` is a mergekit-style YAML path, a dict, or a loaded ``Recipe``.
    Keyword arguments override ``MergeOptions`` fields (``device``, ``threads``,
    ``out_shard_size``, ``overwrite``, ...). With ``dry_run`` nothing is written.
    Raises ``InputError`` listing every problem with the recipe or the models.
    """
    # A copy: the caller's options object is left as it was (replace also rejects unknown names).
    options = dataclasses.replace(options or MergeOptions(), **kwargs)
    out_dir = Path(out_dir)
    plan = plan_merge(recipe, options, out_dir=out_dir, writing=not dry_run)
    try:
        if dry_run:
            return MergeResult(None, plan)
        # Planning read only headers; the lock comes before any weight is read, so a second run on
        # this output stops here, at once.
        with OutputLock(out_dir):
            # A run killed outright (SIGKILL) left its hidden folders: remove them, and put back a
            # previous model it had moved aside, before deciding whether the output exists.
            remove_stale_partials(out_dir)
            if out_dir.exists() and not options.overwrite:  # another run may have finished meanwhile
                raise InputError(f"{out_dir}: already exists; choose another output directory or pass --overwrite")
            if plan.stats is not None and plan.stats.missing():
                plan.stats.compute(str(pick_device(options.device)), options.progress, plan)
                plan.stats.attach(plan)
            return execute_plan(plan, out_dir, options)
    finally:
        for m in plan.models:
            m.checkpoint.close()


def option_problems(options: MergeOptions) -> list[str]:
    """What is wrong with the merge options (the CLI flags), before any work."""
    problems = []
    try:
        pick_device(options.device)
    except InputError as err:
        problems += err.problems
    if options.vocab_mismatch not in ("resize", "error"):
        problems.append(f"vocab_mismatch = {options.vocab_mismatch!r} must be resize or error")
    if options.threads is not None and options.threads < 1:
        problems.append(f"--threads {options.threads} must be at least 1 (or left out for torch's default)")
    if options.out_shard_size < 1:
        problems.append(f"--out-shard-size {options.out_shard_size} must be at least one byte, e.g. 5GB")
    if options.prefetch_bytes < 0:
        problems.append(f"--prefetch {options.prefetch_bytes} must not be negative")
    if options.chunk_bytes < 0:
        problems.append(f"--chunk {options.chunk_bytes} must not be negative (0 merges every tensor whole)")
    return problems


def plan_merge(recipe: Union[str, Path, dict, Recipe], options: Optional[MergeOptions] = None, *,
               out_dir: Optional[Union[str, Path]] = None, writing: bool = False) -> MergePlan:
    """Check everything that can be checked without reading a weight, then plan every output tensor.

    Problems with the options, the recipe, the model folders and the output path are
    gathered and raised together as one ``InputError``: the recipe is checked, and the
    model folders it names are opened, even when the other one has problems. With
    ``out_dir``, an output that is, contains or lies inside an input is refused
    (``--overwrite`` or not); with ``writing``, so is an existing one without ``--overwrite``.
    """
    options = options or MergeOptions()
    problems = option_problems(options)
    if isinstance(recipe, Recipe):
        refs, where = recipe.models(), recipe.source_name
    else:
        try:
            recipe = load_recipe(recipe)
            refs, where = recipe.models(), recipe.source_name
        except InputError as err:
            problems += err.problems
            try:
                raw, where = read_recipe_raw(recipe)
                refs = model_refs_of(raw)
            except InputError:
                refs, where = [], "recipe"
            recipe = None
    models, model_problems, input_paths = _open_models(refs, where)
    problems += model_problems
    if out_dir is not None:
        out_dir = Path(out_dir)
        # Every file the run reads is an input: the recipe itself and the calibration data too.
        if where != "recipe":
            input_paths[f"the recipe {where}"] = Path(where)
        if recipe is not None and recipe.calibration is not None:
            for files in (recipe.calibration.files, *recipe.calibration.per_model.values()):
                input_paths.update({f"calibration file {f}": Path(f) for f in files})
        if recipe is not None:
            from mergesmith.calibrate.stats_file import setting_files

            for p in recipe.method.params:
                if p.stats_file:
                    input_paths.update({f"parameters.{p.name} file {f}": Path(f).expanduser()
                                        for f in setting_files(recipe.parameters.get(p.name))})
        problems += output_problems(out_dir, input_paths)
        if writing and out_dir.exists() and not options.overwrite:
            problems.append(f"{out_dir}: already exists; choose another output directory or pass --overwrite")
    if recipe is not None and not model_problems:
        problems += _tokenizer_config_problems(recipe, models)
    if problems:
        with _closed_on_error(models):
            raise InputError(_dedupe(problems))
    assert recipe is not None
    by_ref = {m.ref: i for i, m in enumerate(models)}
    first = recipe.slices[0].sources[0].model
    reference = by_ref[recipe.base_model or first]
    ref = models[reference]
    problems: list[str] = []
    notes: list[str] = []

    compute_dtype = dtype_from_name(recipe.dtype) if recipe.dtype else torch.float32
    forced_out = dtype_from_name(recipe.out_dtype or recipe.dtype) if (recipe.out_dtype or recipe.dtype) else None
    seed = options.random_seed if options.random_seed is not None else recipe.random_seed
    method = recipe.method

    # Layer ranges: the models: form takes every layer of each model.
    for sl in recipe.slices:
        for src in sl.sources:
            n = models[by_ref[src.model]].layers
            if src.layer_range is None:
                src.layer_range = (0, n)
            elif src.layer_range[1] > n:
                problems.append(f"{where}: {src.field}.layer_range = {list(src.layer_range)} is out of bounds: "
                                f"{src.model} has {n} layers")
    if recipe.form == "models":
        counts = {src.model: src.layer_range[1] for src in recipe.slices[0].sources}
        if len(set(counts.values())) > 1:
            problems.append(f"{where}: the models have different layer counts "
                            f"({', '.join(f'{k}: {v}' for k, v in counts.items())}); use slices: to pick layers")
    if problems:
        with _closed_on_error(models):
            raise InputError(problems)

    tensors: list[TensorPlan] = []
    vocab_warned: set[tuple[int, int]] = set()

    def plan_tensor(out_name: str, sl: Slice, input_names: list[str], t: float) -> None:
        srcs = sl.sources
        idx = [by_ref[s.model] for s in srcs]
        shapes = []
        for mi, name, src in zip(idx, input_names, srcs):
            info = models[mi].checkpoint.infos.get(name)
            if info is None:
                problems.append(f"{where}: {src.field}: {src.model} has no tensor {name} (needed for {out_name}); "
                                "the models' architectures do not line up")
                return
            shapes.append(info.shape)
        ref_pos = next((k for k, mi in enumerate(idx) if mi == reference), 0)
        ref_name = input_names[ref_pos]
        ref_info = models[idx[ref_pos]].checkpoint.infos[ref_name]
        out_shape = tuple(shapes[ref_pos])
        if ref_pos == 0 and reference not in idx:
            ref_info_out = ref.checkpoint.infos.get(out_name)
            if ref_info_out is not None and is_vocab_tensor(out_name):
                out_shape = ref_info_out.shape
        inputs = []
        for k, (mi, name, shape, src) in enumerate(zip(idx, input_names, shapes, srcs)):
            rows = None
            if tuple(shape) != out_shape:
                vocab_axis_only = (is_vocab_tensor(out_name) and len(shape) == len(out_shape)
                                   and tuple(shape[1:]) == tuple(out_shape[1:]))
                if not vocab_axis_only:
                    problems.append(f"{where}: {src.field}: {src.model}:{name} has shape {list(shape)} but "
                                    f"{ref.ref} has {list(out_shape)}; the models' architectures do not line up")
                    continue
                if options.vocab_mismatch == "error":
                    problems.append(f"{where}: {src.field}: {src.model} has a vocabulary of {shape[0]} rows in {name}, "
                                    f"the output has {out_shape[0]}; align the tokenizers or allow resizing "
                                    "(vocab_mismatch=resize)")
                    continue
                rows = out_shape[0]
                if (mi, shape[0]) not in vocab_warned:
                    vocab_warned.add((mi, shape[0]))
                    if shape[0] > out_shape[0]:
                        dropped = list(range(out_shape[0], shape[0]))
                        toks = vocab_tokens(models[mi].path, dropped)
                        msg = (f"{src.model}: vocabulary has {shape[0]} rows, the output {out_shape[0]}: "
                               f"rows {out_shape[0]}..{shape[0] - 1} ({len(dropped)} tokens"
                               + (f", e.g. {', '.join(toks)}" if toks else "") + ") are dropped from its embeddings")
                    else:
                        msg = (f"{src.model}: vocabulary has {shape[0]} rows, the output {out_shape[0]}: rows "
                               f"{shape[0]}..{out_shape[0] - 1} are taken from {ref.ref} for this model")
                    warnings.warn(msg, stacklevel=3)
                    notes.append(msg)
            inputs.append(InputRef(mi, name, rows))
        if len(inputs) != len(srcs):
            return
        base_index = None
        if method.base is not BasePolicy.IGNORED and sl.base_model is not None:
            base_index = next((k for k, s in enumerate(srcs) if s.model == sl.base_model), None)
        shared_scopes = [sl.parameters, recipe.parameters]
        try:
            params = {p.name: resolve_param(p, shared_scopes, out_name, t) for p in method.params if not p.per_model}
        except KeyError as err:
            problems.append(f"{where}: {out_name}: parameters.{err.args[0]} matches no filter for this tensor; "
                            "add an entry without a filter")
            return
        model_params = []
        for k, (src, name) in enumerate(zip(srcs, input_names)):
            scopes = [src.parameters, sl.parameters, recipe.parameters]
            values = {}
            for p in method.params:
                if not p.per_model or (k == base_index and not p.on_base):
                    continue
                try:
                    values[p.name] = resolve_param(p, scopes, name, t)
                except KeyError:
                    problems.append(f"{where}: {src.field}.parameters.{p.name} matches no filter for {name}; "
                                    "add an entry without a filter")
            model_params.append(values)
        if method.check_params is not None and len(model_params) == len(srcs):
            for msg in method.check_params(params, model_params):
                problems.append(f"{where}: {out_name}: {msg}")
        if not ref_info.dtype.is_floating_point:
            notes.append(f"{out_name}: not a float tensor; copied from the first input")
        out_dtype = forced_out or ref_info.dtype
        tensors.append(TensorPlan(out_name, out_shape, out_dtype, inputs, base_index, params, model_params, t,
                                  zlib.crc32(f"{seed}:{out_name}".encode())))

    # Non-layer tensors: embeddings take the first slice's sources, the rest the last slice's; both at
    # t = 0. Planned in model order (embeddings, layers, the rest) so that the two vocabulary-sized
    # tensors are never read ahead while the other is being merged.
    ref_names = [n for n in ref.checkpoint.infos if not is_skipped(n)]
    non_layer = [n for n in ref_names if split_layer_name(n) is None]

    def plan_non_layer(names: list[str], sl: Slice) -> None:
        for name in names:
            plan_tensor(name, sl, [_input_name(models[by_ref[s.model]], name) for s in sl.sources], 0.0)

    plan_non_layer([n for n in non_layer if is_pre_layer(n)], recipe.slices[0])

    # Layers: layer i of an n-layer slice sits at t = i / (n - 1).
    out_layer = 0
    layer_types: list[Any] = []
    ref_layer_prefix = next((split_layer_name(n).prefix for n in ref_names if split_layer_name(n)), None)
    for sl in recipe.slices:
        lead = sl.sources[0]
        lead_model = models[by_ref[lead.model]]
        lo, hi = lead.layer_range
        n = hi - lo
        for i in range(n):
            t = i / (n - 1) if n > 1 else 1.0
            suffixes = _layer_suffixes(lead_model, lo + i)
            if not suffixes:
                problems.append(f"{where}: {lead.field}: {lead.model} has no tensors for layer {lo + i}")
            for suffix, prefix in suffixes:
                input_names = []
                for src in sl.sources:
                    m = models[by_ref[src.model]]
                    src_prefix = _layer_prefix(m) or prefix
                    input_names.append(f"{src_prefix}.{src.layer_range[0] + i}.{suffix}")
                plan_tensor(f"{ref_layer_prefix or prefix}.{out_layer}.{suffix}", sl, input_names, t)
            types = lead_model.config.get("layer_types")
            if isinstance(types, list) and lo + i < len(types):
                layer_types.append(types[lo + i])
            out_layer += 1

    plan_non_layer([n for n in non_layer if not is_pre_layer(n)], recipe.slices[-1])
    if problems:
        with _closed_on_error(models):
            raise InputError(_dedupe(problems))
    out_config = _output_config(ref.config, out_layer, layer_types, tensors, forced_out)
    plan = MergePlan(recipe, models, reference, tensors, out_config, compute_dtype, notes)
    with _closed_on_error(models):
        if method.needs_stats:
            from mergesmith.calibrate import plan_statistics

            plan.stats = plan_statistics(recipe, models, method.needs_stats)
            plan.stats.attach(plan)
        file_params = [p.name for p in method.params if p.stats_file]
        if file_params:
            from mergesmith.calibrate.stats_file import attach_stats_files

            attach_stats_files(plan, file_params)
    return plan


@contextlib.contextmanager
def _closed_on_error(models: list["ModelInfo"]):
    """Close the models' checkpoints if planning fails after opening them."""
    try:
        yield
    except BaseException:
        for m in models:
            m.checkpoint.close()
        raise


def execute_plan(plan: MergePlan, out_dir: Path, options: MergeOptions) -> MergeResult:
    """Stream the plan into ``out_dir``; atomic: a failure or interrupt leaves no output directory."""
    with _heap_reuse():
        return _execute_plan(plan, out_dir, options)


@contextlib.contextmanager
def _heap_reuse():
    """Serve large allocations from glibc's heap instead of fresh mmaps while merging.

    By default glibc maps every allocation above 32 MiB anew and unmaps it on free, so each
    temporary tensor costs a page fault per 4 KiB page and the kernel zeroing it; measured on
    the 1.1B TIES benchmark that was a third of the run time (system time). Keeping freed
    memory in the heap lets the next tensor of the same size reuse it. glibc only; restored after.
    """
    libc = malloc.libc()
    if libc is None:
        yield
        return
    M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = malloc.M_TRIM_THRESHOLD, malloc.M_MMAP_MAX, malloc.M_ARENA_MAX
    # One arena: the reader thread allocates the tensors the main thread frees; with an arena
    # per thread the freed memory could not serve the other thread and the heap would grow.
    libc.mallopt(M_ARENA_MAX, 1)
    libc.mallopt(M_MMAP_MAX, 0)
    libc.mallopt(M_TRIM_THRESHOLD, 2 ** 30)
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_MAX, 65536)
        libc.mallopt(M_TRIM_THRESHOLD, 128 * 1024)
        if hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)


def _claim_threads(count: int) -> None:
    """Fix the calling thread's torch thread count at ``count``.

    torch keeps one count per thread, but a thread takes it, on its first parallel op, from
    the count some thread last asked for. The reader and writer ask for one (left at the
    default, each runs its conversions on a parallel team whose threads keep spinning after
    each op and take the cores from the math: TSV-M on the 58M family of
    benchmarks/bench_subspace.py took 24.8 s so), and ``mergesmith merge``'s main thread has
    run nothing parallel before it merges, so its math took their count of one: WUDI used one
    of the two cores. A parallel op first settles the thread's own count, then it is set.
    """
    torch.ones(1 << 16).sum()
    torch.set_num_threads(count)


def _execute_plan(plan: MergePlan, out_dir: Path, options: MergeOptions) -> MergeResult:
    """Stream the plan, the calling thread's math on ``options.threads`` (default: torch's count).

    The count last asked for is put back afterwards, so that a thread started later does not
    take the reader's and writer's count of one (``_claim_threads``).
    """
    threads = options.threads or torch.get_num_threads()
    _claim_threads(threads)
    try:
        return _stream(plan, out_dir, options)
    finally:
        torch.set_num_threads(threads)


def _stream(plan: MergePlan, out_dir: Path, options: MergeOptions) -> MergeResult:
    start = time.perf_counter()
    device = pick_device(options.device)
    method = plan.recipe.method
    out_specs = [OutputTensor(t.name, t.out_dtype, t.shape) for t in plan.tensors]
    writer = CheckpointWriter(out_dir, out_specs, options.out_shard_size, overwrite=options.overwrite)
    free = shutil.disk_usage(writer.tmp_dir.parent if writer.tmp_dir.parent.exists() else Path.cwd()).free
    if free < writer.total_bytes:
        raise ResourceError(f"{out_dir}: the merged model needs {human_bytes(writer.total_bytes)} of disk, only "
                            f"{human_bytes(free)} is free there; free some space or choose another output path")
    writer.tmp_dir.parent.mkdir(parents=True, exist_ok=True)

    bar = tqdm(total=plan.bytes_to_read, unit="B", unit_scale=True, desc=f"merge ({method.name})",
               disable=not options.progress, file=sys.stderr)
    with writer, ThreadPoolExecutor(1, thread_name_prefix="read", initializer=_claim_threads, initargs=(1,)) as reader, \
            ThreadPoolExecutor(1, thread_name_prefix="write", initializer=_claim_threads, initargs=(1,)) as write_pool:
        # Work items are whole tensors or row blocks of one; the reader, the prefetch budget and
        # the writer treat both alike.
        loads: deque[tuple[TensorPlan, Span, Future]] = deque()
        writes: deque[Future] = deque()
        in_flight = 0
        queue = ((task, span) for task in plan.tensors for span in row_spans(plan, task, options.chunk_bytes))
        done = False

        def fill() -> None:
            nonlocal in_flight, done
            while not done and (not loads or in_flight < options.prefetch_bytes):
                item = next(queue, None)
                if item is None:
                    done = True
                    return
                task, span = item
                in_flight += _load_bytes(plan, task, span)
                loads.append((task, span, reader.submit(load_inputs, plan, task, device, options.allow_nonfinite,
                                                        span)))

        fill()
        while loads:
            task, span, future = loads.popleft()
            tensors, stats = future.result()
            in_flight -= _load_bytes(plan, task, span)
            fill()
            out = _run_method(plan, task, tensors, device, options.allow_nonfinite, stats, span)
            del tensors, stats
            while len(writes) >= 2:
                writes.popleft().result()
            if span is None:
                writes.append(write_pool.submit(writer.write, task.name, out))
            else:
                writes.append(write_pool.submit(writer.write, task.name, out, row=span[0]))
            # Whole tensors' bytes per block, so that the blocks of a tensor add up to it exactly.
            lo, hi = span or (0, 1)
            n = task.shape[0] if span else 1
            bar.update(task.input_bytes(plan) * hi // n - task.input_bytes(plan) * lo // n)
        for w in writes:
            w.result()
        _write_side_files(plan, writer)
        writer.commit()
    bar.close()
    return MergeResult(out_dir, plan, time.perf_counter() - start, len(plan.tensors))


# ----------------------------------------------------------------------------- steps


def _load_bytes(plan: MergePlan, task: TensorPlan, span: Span = None) -> int:
    """What reading one tensor's inputs (or a row block of them), in the compute dtype, and their
    statistics (their rows of those shaped like the tensor) holds in memory."""
    return _span_numel(task, span) * _itemsize(plan.compute_dtype) * len(task.inputs) + task.stats_bytes(span)


def _span_numel(task: TensorPlan, span: Span) -> int:
    if span is None:
        return _numel(task.shape)
    return (span[1] - span[0]) * _numel(task.shape[1:])


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
    total = _load_bytes(plan, task)
    if total <= chunk_bytes:
        return [None]
    first = task.inputs[0]
    if not plan.models[first.model].checkpoint.infos[first.name].dtype.is_floating_point:
        return [None]
    readers = [(plan.models[ref.model].checkpoint, ref.name) for ref in task.inputs]
    if any(ref.rows is not None for ref in task.inputs):
        reference = plan.models[plan.reference]
        readers.append((reference.checkpoint, _reference_name(plan, task)))
    if not all(ckpt.reads_rows_cheaply(name) for ckpt, name in readers):
        return [None]
    if not method.row_separable(task.params, is_vocab_tensor(task.name), len(task.shape)):
        return [None]
    n = task.shape[0]
    rows = max(1, chunk_bytes // max(1, total // n))
    if rows >= n:
        return [None]
    return [(lo, min(lo + rows, n)) for lo in range(0, n, rows)]


def load_inputs(plan: MergePlan, task: TensorPlan, device: torch.device, allow_nonfinite: bool = False,
                rows: Span = None) -> tuple[list[torch.Tensor], Optional[list[dict[str, torch.Tensor]]]]:
    """The input tensors in the compute dtype, and their calibration statistics (as stored) if planned.

    ``rows``: only rows ``lo:hi`` of each input (of the output's rows: a vocabulary padded from
    the reference model is padded in those rows alone), and of each statistic shaped like the
    tensor (``TensorPlan.row_shaped``; the others whole), for a tensor merged in row blocks.
    """
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
    if task.stats is None:
        return out, None
    from mergesmith.calibrate import StatsStore

    return out, [{kind: StatsStore.read(ref, rows if task.row_shaped(ref) else None).to(device)
                  for kind, ref in refs.items()} for refs in task.stats]


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
    return _run_method(plan, task, tensors, device, False, stats)


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


def _reference_name(plan: MergePlan, task: TensorPlan) -> str:
    ref = plan.models[plan.reference]
    return task.name if task.name in ref.checkpoint else _input_name(ref, task.name)


def _reference_rows(plan: MergePlan, task: TensorPlan, lo: int, hi: int) -> torch.Tensor:
    ref = plan.models[plan.reference]
    name = _reference_name(plan, task)
    rows = ref.checkpoint.read_rows(name, lo, hi).to(plan.compute_dtype, copy=True)
    ref.checkpoint.release(name)
    return rows


def _run_method(plan: MergePlan, task: TensorPlan, tensors: list[torch.Tensor], device: torch.device,
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


def _write_side_files(plan: MergePlan, writer: CheckpointWriter) -> None:
    ref = plan.models[plan.reference]
    writer.write_file("config.json", json.dumps(plan.out_config, indent=2, sort_keys=True) + "\n")
    if (ref.path / "generation_config.json").is_file():
        writer.copy_file(ref.path / "generation_config.json")
    tok_dir = _tokenizer_dir(plan.recipe, plan.models)
    for name in TOKENIZER_FILES:
        if (tok_dir / name).is_file():
            writer.copy_file(tok_dir / name)
    if plan.recipe.chat_template:
        cfg_path = writer.tmp_dir / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        cfg["chat_template"] = plan.recipe.chat_template
        writer.write_file("tokenizer_config.json", json.dumps(cfg, indent=2) + "\n")
    writer.write_file("mergesmith_recipe.yml", plan.recipe.to_yaml())
    writer.write_file("README.md", _model_card(plan))


def _tokenizer_dir(recipe: Recipe, models: list[ModelInfo]) -> Path:
    """The folder the output's tokenizer files come from: tokenizer_source, else the reference model."""
    source = recipe.tokenizer_source
    if source in (None, "base"):
        source = recipe.base_model or recipe.slices[0].sources[0].model
    return next(m.path for m in models if m.ref == source)


def _tokenizer_config_problems(recipe: Recipe, models: list[ModelInfo]) -> list[str]:
    """A chat_template is written into tokenizer_config.json: check that file now, not after the merge."""
    if not recipe.chat_template:
        return []
    path = _tokenizer_dir(recipe, models) / "tokenizer_config.json"
    if not path.is_file():
        return []
    try:
        config = json.loads(read_text(path))
    except InputError as err:
        return err.problems
    except json.JSONDecodeError as err:
        return [f"{path}: not valid JSON ({err}); chat_template cannot be added to it"]
    if not isinstance(config, dict):
        return [f"{path}: must hold a JSON object, not {type(config).__name__}; chat_template cannot be added to it"]
    return []


def _model_card(plan: MergePlan) -> str:
    from mergesmith._version import __version__

    m = plan.recipe.method
    models = "\n".join(f"- `{mi.ref}`" + (" (base)" if i == plan.reference and plan.recipe.base_model else "")
                       for i, mi in enumerate(plan.models))
    return (f"---\nlibrary_name: transformers\ntags:\n- mergesmith\n- merge\n---\n"
            f"# {plan.recipe.raw.get('name') or 'Merged model'}\n\n"
            f"Merged with [mergesmith](https://pypi.org/project/mergesmith/) {__version__} using the "
            f"**{m.name}** method" + (f" ({m.reference})" if m.reference else "") + ".\n\n"
            f"## Models\n\n{models}\n\n## Recipe\n\n```yaml\n{plan.recipe.to_yaml()}```\n")


# ----------------------------------------------------------------------------- helpers


def _open_models(refs: list[str], where: str) -> tuple[list["ModelInfo"], list[str], dict[str, Path]]:
    """Resolve every model reference, read configs and headers.

    Returns the models that opened, every problem found, and every input path
    (model folders and LoRA adapter folders, by the reference that names them).
    """
    problems: list[str] = []
    located: list[tuple[str, Path, Optional[Path]]] = []
    input_paths: dict[str, Path] = {}
    for ref in refs:
        model_ref, lora_ref = split_lora_ref(ref)
        try:
            path = resolve_model_path(model_ref)
            input_paths[model_ref] = path
            adapter = resolve_model_path(lora_ref) if lora_ref else None
            if adapter is not None:
                input_paths[lora_ref] = adapter
            located.append((ref, path, adapter))
        except InputError as err:
            problems.extend(f"{where}: {p}" for p in err.problems)
    infos = []
    for ref, path, adapter in located:
        config = None
        try:
            config = read_config(path / "config.json")
        except InputError as err:  # still open the weights below: their problems are reported too
            problems.extend(f"{where}: {ref}: {p}" for p in err.problems)
        try:
            ckpt = Checkpoint.open(path)
            if adapter is not None:
                ckpt = LoraCheckpoint.open(ckpt, adapter)
        except InputError as err:
            problems.extend(f"{where}: {ref}: {p}" for p in err.problems)
            continue
        if config is None:
            ckpt.close()
            continue
        layers = num_layers(config)
        if layers is None:
            layers = len({split_layer_name(n).index for n in ckpt.infos if split_layer_name(n)})
        infos.append(ModelInfo(ref, path, config, ckpt, layers))
    archs = {m.ref: (m.config.get("architectures") or [m.config.get("model_type", "?")])[0] for m in infos}
    if len(set(archs.values())) > 1:
        problems.append(f"{where}: the models have different architectures "
                        f"({', '.join(f'{k}: {v}' for k, v in archs.items())}); merge models of one architecture")
    return infos, problems, input_paths


def resolve_model_path(ref: str) -> Path:
    """A local folder, or a Hugging Face Hub repo id downloaded through huggingface_hub."""
    path = Path(ref).expanduser()
    if path.is_dir():
        return path
    looks_like_repo = ref.count("/") == 1 and not ref.startswith((".", "/", "~")) and not path.exists()
    if not looks_like_repo:
        raise InputError(f"{ref}: no such model folder; check the path")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(ref, allow_patterns=["*.json", "*.safetensors", "*.bin", "*.model",
                                                           "*.txt", "*.jinja"]))
    except Exception as err:  # offline, unknown repo, gated repo, ...
        raise InputError(f"{ref}: not a local folder, and fetching it from the Hugging Face Hub failed "
                         f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); check the path, "
                         "or go online, or point HF_HOME at a cache that has it") from None


def _input_name(model: ModelInfo, name: str) -> str:
    """``name`` in ``model``; a tied model's lm_head is its token embedding."""
    if name in model.checkpoint.infos:
        return name
    if "lm_head" in name:
        tied = tied_embedding_name(model.names)
        if tied is not None:
            return tied
    return name


def _layer_prefix(model: ModelInfo) -> Optional[str]:
    for n in model.checkpoint.infos:
        parts = split_layer_name(n)
        if parts:
            return parts.prefix
    return None


def _layer_suffixes(model: ModelInfo, index: int) -> list[tuple[str, str]]:
    out = []
    for n in model.checkpoint.infos:
        parts = split_layer_name(n)
        if parts and parts.index == index and not is_skipped(n):
            out.append((parts.suffix, parts.prefix))
    return out


def _output_config(config: dict, layers: int, layer_types: list, tensors: list[TensorPlan],
                   forced_out: Optional[torch.dtype]) -> dict:
    cfg = json.loads(json.dumps(config))
    target = cfg["text_config"] if isinstance(cfg.get("text_config"), dict) and "num_hidden_layers" not in cfg else cfg
    for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        if isinstance(target.get(key), int):
            target[key] = layers
            break
    if isinstance(target.get("layer_types"), list) and len(layer_types) == layers:
        target["layer_types"] = layer_types
    dtypes = {t.out_dtype for t in tensors if t.out_dtype.is_floating_point}
    if forced_out is not None or len(dtypes) == 1:
        name = dtype_name(forced_out or dtypes.pop())
        keys = [k for k in ("dtype", "torch_dtype") if k in cfg] or ["torch_dtype"]
        for k in keys:
            cfg[k] = name
    return cfg


def _dedupe(problems: list[str], limit: int = 50) -> list[str]:
    seen: dict[str, None] = {}
    for p in problems:
        seen.setdefault(p, None)
    out = list(seen)
    if len(out) > limit:
        out = out[:limit] + [f"... and {len(out) - limit} more problems like these"]
    return out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()

