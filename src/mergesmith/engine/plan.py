"""Plan a merge: a recipe in, a ``MergePlan`` out, from configs and checkpoint headers only.

``plan_merge`` runs small steps, each a function that reports problems instead of
raising, so that one ``InputError`` lists every problem found before any weight is read:

1. ``read_recipe``: the recipe, or, when it has problems, the model references it names;
2. ``open_models`` (``models.py``): every model folder, config and checkpoint header;
3. ``input_problems``: the options, the output path against every input, the tokenizer file;
   ``plan_vocabulary``: for a recipe with a tokenizer, the output's vocabulary from every model's
   tokenizer (``vocab/``);
4. ``resolve_layer_ranges``: each source's layer range (the ``models:`` form takes them all);
5. ``lay_out`` (``layout.py``): every output tensor's name and its inputs' names, in model order;
6. ``plan_tensor``, per output tensor: ``input_shapes``, ``output_shape``, ``input_refs`` (with
   the vocabulary rows each input keeps or is padded to; with a tokenizer, ``vocabulary_rows``
   maps them by token instead), ``base_position``, ``resolve_params``;
7. ``output_config``: the output's config.json;
8. ``attach_statistics``: what a data-aware method reads beside the weights, asked of a
   ``StatisticsSource`` (an interface defined here, implemented by ``calibrate``).

A new way to build the output is a new step or a new producer of ``Slot``s, not a branch
in these.
"""

from __future__ import annotations

import json
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Protocol, Union

import torch

from mergesmith.checkpoint.layout import is_vocab_tensor, split_layer_name, vocab_tokens
from mergesmith.checkpoint.reader import dtype_from_name, dtype_name
from mergesmith.engine.layout import Slot, lay_out, output_layer_types
from mergesmith.engine.merge_plan import InputRef, MergePlan, Statistics, TensorPlan
from mergesmith.engine.models import ModelInfo, closed_on_error, open_models
from mergesmith.engine.options import MergeOptions, option_problems
from mergesmith.engine.side_files import tokenizer_config_problems
from mergesmith.errors import InputError
from mergesmith.methods import BasePolicy, MethodSpec
from mergesmith.paths import output_problems
from mergesmith.recipe import ParamResolver, Recipe, load_recipe, model_refs_of, read_recipe_raw
from mergesmith.vocab.union import RowMap, VocabularyPlan, build_vocabulary


class StatisticsSource(Protocol):
    """Where the statistics a data-aware method reads come from (``calibrate.CALIBRATION``): the
    engine asks, the room that computes and caches them answers."""

    def input_files(self, recipe: Recipe) -> dict[str, Path]:
        """The files the statistics are read from, by what each is (the output must not touch them)."""

    def plan(self, plan: MergePlan) -> Optional[Statistics]:
        """Record in every tensor of ``plan`` the statistics its inputs have (``TensorPlan.stats``);
        return the calibration statistics (cached, or to compute before merging), or None."""


def plan_merge(recipe: Union[str, Path, dict, Recipe], options: Optional[MergeOptions] = None, *,
               out_dir: Optional[Union[str, Path]] = None, writing: bool = False,
               statistics: Optional[StatisticsSource] = None) -> MergePlan:
    """Check everything that can be checked without reading a weight, then plan every output tensor.

    Problems with the options, the recipe, the model folders and the output path are
    gathered and raised together as one ``InputError``: the recipe is checked, and the
    model folders it names are opened, even when the other one has problems. With
    ``out_dir``, an output that is, contains or lies inside an input is refused
    (``--overwrite`` or not); with ``writing``, so is an existing one without ``--overwrite``.
    ``statistics`` answers for a method that reads statistics beside the weights; without one,
    such a recipe is a problem (``mergesmith.api.plan_merge`` passes calibrate's).
    """
    options = options or MergeOptions()
    recipe, refs, where, problems = read_recipe(recipe)
    models, model_problems, input_paths = open_models(refs, where)
    with closed_on_error(models):
        problems = option_problems(options) + problems + model_problems
        problems += input_problems(recipe, where, models, input_paths, options, out_dir, writing, model_problems,
                                   statistics)
        vocabulary = None
        if recipe is not None and not model_problems:
            vocabulary, found = plan_vocabulary(recipe, models, where)
            problems += found
        if problems:
            raise InputError(_dedupe(problems))
        assert recipe is not None
        ctx = start_planning(recipe, where, models, options)
        ctx.vocabulary = vocabulary
        problems = resolve_layer_ranges(recipe, models, ctx.by_ref, where)
        if problems:
            raise InputError(problems)
        tensors = []
        for slot in lay_out(recipe, models, ctx.by_ref, models[ctx.reference], where, ctx.problems):
            planned = plan_tensor(ctx, slot)
            if planned is not None:
                tensors.append(planned)
        ctx.problems += ctx.resolver.problems()
        if ctx.problems:
            raise InputError(_dedupe(ctx.problems))
        layers, layer_types = output_layer_types(recipe, models, ctx.by_ref)
        out_config = output_config(models[ctx.reference].config, layers, layer_types, tensors, ctx.out_dtype,
                                   vocabulary.rows if vocabulary is not None else None)
        if vocabulary is not None:
            for note in vocabulary.notes:
                warnings.warn(note, stacklevel=2)
            ctx.notes += vocabulary.notes
        plan = MergePlan(recipe, models, ctx.reference, tensors, out_config, ctx.compute_dtype, ctx.notes,
                         vocabulary=vocabulary)
        problems = aligned_statistics_problems(plan)
        if problems:
            raise InputError(problems)
        attach_statistics(plan, statistics)
    return plan


# ----------------------------------------------------------------------------- steps before any tensor


def read_recipe(recipe: Union[str, Path, dict, Recipe]) -> tuple[Optional[Recipe], list[str], str, list[str]]:
    """The loaded recipe (None when it has problems), the model references it names (read from the
    raw file even then, so that the models are checked too), where it came from, its problems."""
    if isinstance(recipe, Recipe):
        return recipe, recipe.models(), recipe.source_name, []
    try:
        loaded = load_recipe(recipe)
        return loaded, loaded.models(), loaded.source_name, []
    except InputError as err:
        try:
            raw, where = read_recipe_raw(recipe)
            refs = model_refs_of(raw)
        except InputError:
            refs, where = [], "recipe"
        return None, refs, where, list(err.problems)


def input_problems(recipe: Optional[Recipe], where: str, models: list[ModelInfo], input_paths: dict[str, Path],
                   options: MergeOptions, out_dir: Optional[Union[str, Path]], writing: bool,
                   model_problems: list[str], statistics: Optional[StatisticsSource]) -> list[str]:
    """The output path against every file the run reads (the models, the recipe, its calibration
    data and statistics files), an existing output, the tokenizer config a chat_template goes
    into, and a method that reads statistics with no source to ask for them."""
    problems = []
    if out_dir is not None:
        out_dir = Path(out_dir)
        if where != "recipe":
            input_paths[f"the recipe {where}"] = Path(where)
        if recipe is not None:
            input_paths.update(calibration_files(recipe))
        if recipe is not None and statistics is not None:
            input_paths.update(statistics.input_files(recipe))
        problems += output_problems(out_dir, input_paths)
        if writing and out_dir.exists() and not options.overwrite:
            problems.append(f"{out_dir}: already exists; choose another output directory or pass --overwrite")
    if recipe is not None and not model_problems:
        problems += tokenizer_config_problems(recipe, models)
    if recipe is not None and reads_statistics(recipe.method) and statistics is None:
        problems.append(f"{where}: merge_method {recipe.method.name} reads statistics beside the weights, and this "
                        "plan was given no source for them; plan through mergesmith.api (plan_merge, merge), or "
                        "pass statistics=mergesmith.calibrate.CALIBRATION")
    return problems


def plan_vocabulary(recipe: Recipe, models: list[ModelInfo], where: str
                    ) -> tuple[Optional[VocabularyPlan], list[str]]:
    """For a recipe with ``tokenizer_source`` or ``tokenizer:``, the output's vocabulary built from the
    tokenizers of the merged models and of the tokenizer source (tokenizer files only, no weight);
    None for a recipe without one."""
    if recipe.tokenizer is None:
        return None, []
    by_ref = {m.ref: m for m in models}
    refs = list(dict.fromkeys(recipe.input_models() + [m for m in recipe.models() if m not in ("base", "union")]))
    reference = recipe.base_model or recipe.slices[0].sources[0].model
    return build_vocabulary(recipe.tokenizer, [(r, by_ref[r].path, by_ref[r].config) for r in refs],
                            recipe.base_model, reference, where)


def calibration_files(recipe: Recipe) -> dict[str, Path]:
    """The calibration data files the recipe names (read to compute statistics), by what each is."""
    files = {}
    if recipe.calibration is not None:
        for names in (recipe.calibration.files, *recipe.calibration.per_model.values()):
            files.update({f"calibration file {f}": Path(f) for f in names})
    return files


def reads_statistics(method: MethodSpec) -> bool:
    """Whether the method reads statistics beside the weights: calibration statistics, or a parameter
    naming a statistics file."""
    return bool(method.needs_stats) or any(p.stats_file for p in method.params)


def resolve_layer_ranges(recipe: Recipe, models: list[ModelInfo], by_ref: dict[str, int], where: str) -> list[str]:
    """Give every source its layer range (the ``models:`` form takes every layer of each model) and
    check the ranges against the models."""
    problems = []
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
    return problems


# ----------------------------------------------------------------------------- one output tensor


@dataclass
class Planning:
    """What the per-tensor steps share while one recipe is planned, and the problems and notes
    they gather."""

    recipe: Recipe
    where: str
    models: list[ModelInfo]
    options: MergeOptions
    by_ref: dict[str, int]
    reference: int  # the model whose config, layout and tokenizer the output takes
    compute_dtype: torch.dtype
    out_dtype: Optional[torch.dtype]  # the recipe's out_dtype (or dtype); None: each tensor's own
    seed: int
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    vocab_warned: set[tuple[int, int]] = field(default_factory=set)  # (model, rows) already warned of
    vocabulary: Optional[VocabularyPlan] = None  # the output's vocabulary, for a recipe with a tokenizer
    resolver: Optional[ParamResolver] = None  # each tensor's parameters; reports what has none, grouped


def start_planning(recipe: Recipe, where: str, models: list[ModelInfo], options: MergeOptions) -> Planning:
    by_ref = {m.ref: i for i, m in enumerate(models)}
    reference = by_ref[recipe.base_model or recipe.slices[0].sources[0].model]
    out_name = recipe.out_dtype or recipe.dtype
    return Planning(recipe, where, models, options, by_ref, reference,
                    compute_dtype=dtype_from_name(recipe.dtype) if recipe.dtype else torch.float32,
                    out_dtype=dtype_from_name(out_name) if out_name else None,
                    seed=options.random_seed if options.random_seed is not None else recipe.random_seed,
                    resolver=ParamResolver(recipe))


def plan_tensor(ctx: Planning, slot: Slot) -> Optional[TensorPlan]:
    """One output tensor: its inputs, shape, base, parameters and dtype; None (with problems noted)
    when it cannot be planned."""
    idx = [ctx.by_ref[s.model] for s in slot.slice.sources]
    shapes = input_shapes(ctx, slot, idx)
    if shapes is None:
        return None
    ref_pos = next((k for k, mi in enumerate(idx) if mi == ctx.reference), 0)
    row_map = None
    if ctx.vocabulary is not None and is_vocab_tensor(slot.name) and split_layer_name(slot.name) is None:
        mapped = vocabulary_rows(ctx, slot, idx, shapes)
        if mapped is None:
            return None
        out_shape, inputs, row_map = mapped
    else:
        out_shape = output_shape(ctx, slot, idx, shapes, ref_pos)
        inputs = input_refs(ctx, slot, idx, shapes, out_shape)
    if inputs is None:
        return None
    base_index = base_position(ctx, slot)
    resolved = resolve_params(ctx, slot, base_index)
    if resolved is None:
        return None
    params, model_params = resolved
    ref_info = ctx.models[idx[ref_pos]].checkpoint.infos[slot.input_names[ref_pos]]
    if not ref_info.dtype.is_floating_point:
        ctx.notes.append(f"{slot.name}: not a float tensor; copied from the first input")
    return TensorPlan(slot.name, out_shape, ctx.out_dtype or ref_info.dtype, inputs, base_index, params, model_params,
                      slot.t, zlib.crc32(f"{ctx.seed}:{slot.name}".encode()), vocab=row_map)


def input_shapes(ctx: Planning, slot: Slot, idx: list[int]) -> Optional[list[tuple[int, ...]]]:
    """Each input's shape; None when a source lacks its tensor."""
    shapes = []
    for mi, name, src in zip(idx, slot.input_names, slot.slice.sources):
        info = ctx.models[mi].checkpoint.infos.get(name)
        if info is None:
            ctx.problems.append(f"{ctx.where}: {src.field}: {src.model} has no tensor {name} (needed for "
                                f"{slot.name}); the models' architectures do not line up")
            return None
        shapes.append(info.shape)
    return shapes


def output_shape(ctx: Planning, slot: Slot, idx: list[int], shapes: list[tuple[int, ...]],
                 ref_pos: int) -> tuple[int, ...]:
    """The reference input's shape; for a vocabulary tensor of a reference model that is not among
    the inputs (a slice without it), the reference model's own shape."""
    out_shape = tuple(shapes[ref_pos])
    if ref_pos == 0 and ctx.reference not in idx:
        own = ctx.models[ctx.reference].checkpoint.infos.get(slot.name)
        if own is not None and is_vocab_tensor(slot.name):
            out_shape = own.shape
    return out_shape


def input_refs(ctx: Planning, slot: Slot, idx: list[int], shapes: list[tuple[int, ...]],
               out_shape: tuple[int, ...]) -> Optional[list[InputRef]]:
    """Each input as read: its model and tensor and, for a vocabulary of another size than the
    output's, the rows it keeps or is padded to from the reference model (with a warning, once per
    model). None when an input does not fit the output."""
    inputs = []
    for mi, name, shape, src in zip(idx, slot.input_names, shapes, slot.slice.sources):
        rows = None
        if tuple(shape) != out_shape:
            vocab_axis_only = (is_vocab_tensor(slot.name) and len(shape) == len(out_shape)
                               and tuple(shape[1:]) == tuple(out_shape[1:]))
            if not vocab_axis_only:
                ctx.problems.append(f"{ctx.where}: {src.field}: {src.model}:{name} has shape {list(shape)} but "
                                    f"{ctx.models[ctx.reference].ref} has {list(out_shape)}; the models' "
                                    "architectures do not line up")
                continue
            if ctx.options.vocab_mismatch == "error":
                ctx.problems.append(f"{ctx.where}: {src.field}: {src.model} has a vocabulary of {shape[0]} rows in "
                                    f"{name}, the output has {out_shape[0]}; align the tokenizers or allow resizing "
                                    "(vocab_mismatch=resize)")
                continue
            rows = out_shape[0]
            _warn_vocabulary_once(ctx, mi, src.model, shape[0], out_shape[0])
        inputs.append(InputRef(mi, name, rows))
    return inputs if len(inputs) == len(idx) else None


def vocabulary_rows(ctx: Planning, slot: Slot, idx: list[int], shapes: list[tuple[int, ...]]
                    ) -> Optional[tuple[tuple[int, ...], list[InputRef], RowMap]]:
    """A vocabulary tensor of a recipe with a tokenizer: the output's shape (the vocabulary's rows),
    the inputs read whole or by row, and the map that gathers each input's rows by token (``vocab/``).
    None, with problems noted, when the inputs' other axes differ or a token's source is unreadable."""
    assert ctx.vocabulary is not None
    if any(len(s) != len(shapes[0]) or tuple(s[1:]) != tuple(shapes[0][1:]) for s in shapes):
        ctx.problems.append(f"{ctx.where}: {slot.name}: the models' shapes {[list(s) for s in shapes]} differ beyond "
                            "the vocabulary axis; the models' architectures do not line up")
        return None
    refs = [s.model for s in slot.slice.sources]
    row_map = ctx.vocabulary.row_map(refs, [s[0] for s in shapes], slot.slice.base_model, ctx.where, ctx.problems)
    if row_map is None:
        return None
    inputs = [InputRef(mi, name) for mi, name in zip(idx, slot.input_names)]
    return (ctx.vocabulary.rows, *shapes[0][1:]), inputs, row_map


def _warn_vocabulary_once(ctx: Planning, model: int, ref: str, have: int, want: int) -> None:
    if (model, have) in ctx.vocab_warned:
        return
    ctx.vocab_warned.add((model, have))
    if have > want:
        dropped = list(range(want, have))
        toks = vocab_tokens(ctx.models[model].path, dropped)
        msg = (f"{ref}: vocabulary has {have} rows, the output {want}: rows {want}..{have - 1} ({len(dropped)} "
               "tokens" + (f", e.g. {', '.join(toks)}" if toks else "") + ") are dropped from its embeddings")
    else:
        msg = (f"{ref}: vocabulary has {have} rows, the output {want}: rows {have}..{want - 1} are taken from "
               f"{ctx.models[ctx.reference].ref} for this model")
    warnings.warn(msg, stacklevel=4)
    ctx.notes.append(msg)


def base_position(ctx: Planning, slot: Slot) -> Optional[int]:
    """Which input is the slice's base model, for a method that uses one."""
    if ctx.recipe.method.base is BasePolicy.IGNORED or slot.slice.base_model is None:
        return None
    return next((k for k, s in enumerate(slot.slice.sources) if s.model == slot.slice.base_model), None)


def resolve_params(ctx: Planning, slot: Slot, base_index: Optional[int]
                   ) -> Optional[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """The method's global parameters and each input's own, resolved for this tensor (filters,
    gradients along ``t``) and checked by the method; None when a required one has no value here
    (``ParamResolver.problems`` then reports it with the other tensors it is missing for)."""
    return ctx.resolver.resolve(slot.slice, slot.name, slot.input_names, slot.t, base_index)


# ----------------------------------------------------------------------------- the output as a whole


def output_config(config: dict, layers: int, layer_types: list, tensors: list[TensorPlan],
                  forced_out: Optional[torch.dtype], vocab_size: Optional[int] = None) -> dict:
    """The reference model's config with the output's layer count, layer types, dtype and, with a
    tokenizer, the vocabulary's rows (those of the embeddings written)."""
    cfg = json.loads(json.dumps(config))
    target = cfg["text_config"] if isinstance(cfg.get("text_config"), dict) and "num_hidden_layers" not in cfg else cfg
    if vocab_size is not None:
        (target if "vocab_size" in target or "vocab_size" not in cfg else cfg)["vocab_size"] = vocab_size
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


def attach_statistics(plan: MergePlan, statistics: Optional[StatisticsSource]) -> None:
    """For a method that reads statistics, record in every tensor those its inputs have, and keep the
    calibration statistics to compute before merging (``plan.stats``); the source answers both."""
    if statistics is not None and reads_statistics(plan.recipe.method):
        plan.stats = statistics.plan(plan)


def aligned_statistics_problems(plan: MergePlan) -> list[str]:
    """A method that reads statistics, with a tokenizer setting that moves some model's vocabulary
    rows: refused, naming the tensor. Its statistics are laid out in each model's own row order, and
    aligning them by token is not done yet; merging them against moved rows would be wrong."""
    if not reads_statistics(plan.recipe.method):
        return []
    for task in plan.tensors:
        if task.vocab is None:
            continue
        for k, ref in enumerate(task.inputs):
            if not task.vocab.is_identity(k, plan.models[ref.model].checkpoint.infos[ref.name].shape[0]):
                return [f"{plan.recipe.source_name}: merge_method {plan.recipe.method.name} reads statistics, and "
                        f"the tokenizer setting moves {plan.models[ref.model].ref}'s rows of {task.name}; statistics "
                        "are not aligned by token yet: drop the tokenizer setting, or use a method without "
                        "statistics"]
    return []


def _dedupe(problems: list[str], limit: int = 50) -> list[str]:
    seen: dict[str, None] = {}
    for p in problems:
        seen.setdefault(p, None)
    out = list(seen)
    if len(out) > limit:
        out = out[:limit] + [f"... and {len(out) - limit} more problems like these"]
    return out
