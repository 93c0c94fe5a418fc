"""Calibration statistics for data-aware merges: compute once per model, cache, stream beside weights.

The flow (docs/calibrate.md): ``plan_statistics`` says, for every input model of a
recipe, where its statistics are cached and which are missing; ``StatsPlan.compute``
runs each model that lacks some on its own calibration data, one model in memory
at a time (``collect``), and writes them to the cache (``store``); ``StatsPlan.attach``
records in each planned tensor which statistics each of its inputs has, so that the
engine can read them beside the weights. ``mergesmith calibrate`` and
``mergesmith merge`` both go through here; neither this package nor the engine
knows which method will read the statistics. The engine asks for them through its
``StatisticsSource`` interface, which ``CALIBRATION`` implements (with the per-input
statistics files of ``stats_file``); ``mergesmith.api`` hands it to the engine.

One kind is not per model: ``gram_plusplus`` (RegMean++, ``sequential``) takes each
model's Grams on activations that passed the blocks merged so far, so all input
models are collected together, merging block by block with the recipe's own method;
its cache key covers every input model, all their data and the whole recipe.
"""

from __future__ import annotations

import gc
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from tqdm.auto import tqdm

from mergesmith.calibrate.collect import collect_fisher, collect_grams
from mergesmith.calibrate import sequential
from mergesmith.calibrate.data import CalibrationSettings, data_fingerprint, encode_items, select_items, token_count
from mergesmith.calibrate.stats_file import attach_stats_files, setting_files
from mergesmith.calibrate.store import EntryWriter, StatRef, StatsStore, cache_key, default_cache_dir
from mergesmith.checkpoint.config import model_type_problem
from mergesmith.checkpoint.lora import LoraCheckpoint
from mergesmith.malloc import mapped_allocations
from mergesmith.units import human_bytes
from mergesmith.errors import InputError

KINDS = ("gram", "fisher", sequential.KIND)

__all__ = ["CALIBRATION", "KINDS", "CalibrationSettings", "CalibrationSource", "ModelStats", "StatRef", "StatsPlan",
           "StatsStore", "calibrate_model", "plan_statistics"]


@dataclass
class ModelStats:
    """One input model's statistics: where each kind is (or will be) cached."""

    ref: str
    path: Path
    settings: CalibrationSettings
    folders: dict[str, Path]  # kind -> cache entry
    config: dict[str, Any] = field(default_factory=dict)
    weight_bytes: int = 0  # the model in float32

    def missing(self) -> list[str]:
        return [k for k, f in self.folders.items() if not (f / "index.json").is_file()]

    def stores(self) -> list[StatsStore]:
        return [StatsStore(f) for f in self.folders.values() if (f / "index.json").is_file()]


@dataclass
class StatsPlan:
    kinds: tuple[str, ...]
    models: list[Optional[ModelStats]]  # aligned with the merge plan's models; None: not an input
    computed: list[str] = field(default_factory=list)  # "ref: kind" computed by this process

    def missing(self) -> list[tuple[ModelStats, list[str]]]:
        return [(m, m.missing()) for m in self.models if m is not None and m.missing()]

    def compute(self, device: str = "cpu", progress: bool = True, plan: Any = None) -> None:
        """Compute every missing statistic: per-model kinds one model at a time, ``gram_plusplus`` jointly.

        ``plan`` is the merge plan (``engine.MergePlan``) these statistics serve;
        ``gram_plusplus`` needs it, as its collection merges block by block.
        """
        joint = False
        for entry, kinds in self.missing():
            own = [k for k in kinds if k != sequential.KIND]
            joint = joint or sequential.KIND in kinds
            if own:
                calibrate_model(entry.path, entry.settings, own, entry.folders, device=device, progress=progress,
                                label=entry.ref)
                self.computed += [f"{entry.ref}: {k}" for k in own]
        if joint:
            if plan is None:
                raise ValueError(f"{sequential.KIND} statistics are collected while merging: pass the merge plan")
            entries = {i: m for i, m in enumerate(self.models) if m is not None}
            bar = tqdm(total=len(entries) * sequential.blocks_to_run(plan), unit="block",
                       desc=f"{sequential.KIND} ({len(entries)} models)", disable=not progress)
            try:
                with mapped_allocations():  # as calibrate_model: hundreds of blocks' passes, no heap creep
                    sequential.collect_plusplus(plan, entries, device, bar.update)
            finally:
                bar.close()
            self.computed += [f"{m.ref}: {sequential.KIND}" for m in entries.values()]

    def attach(self, plan: Any) -> None:
        """Record in every planned tensor which statistics each of its inputs has."""
        stores = [m.stores() if m is not None else [] for m in self.models]
        for task in plan.tensors:
            refs: list[dict[str, StatRef]] = []
            for inp in task.inputs:
                found: dict[str, StatRef] = {}
                for store in stores[inp.model]:
                    found.update(store.refs(inp.name))
                refs.append(found)
            task.stats = refs

    def memory_bound(self) -> int:
        own = tuple(k for k in self.kinds if k != sequential.KIND)
        bound = max((calibration_peak_bytes(m, own) for m in self.models if m is not None), default=0)
        if sequential.KIND in self.kinds:
            bound = max(bound, sequential.plusplus_peak_bytes(self.models))
        return bound

    def describe(self) -> list[str]:
        cached = sum(len(m.folders) - len(m.missing()) for m in self.models if m is not None)
        todo = [f"{m.ref} ({', '.join(kinds)})" for m, kinds in self.missing()]
        lines = [f"statistics:      {', '.join(self.kinds)}; {cached} cached"
                 + (f", to compute before merging: {', '.join(todo)}" if todo else "")]
        what = ("every model's embedding, or one block of each model with its Grams, plus every model's "
                "calibration activations; no model whole" if sequential.KIND in self.kinds else
                "one model in float32, one chunk of accumulators, one batch's activations; one model at a time")
        lines.append(f"calibration peak memory: about {human_bytes(self.memory_bound())} ({what}; plus the runtime)"
                     + ("" if todo else "; nothing to compute"))
        return lines


class CalibrationSource:
    """The engine's ``StatisticsSource``: each input model's statistics, cached per kind
    (``plan_statistics``) for a method that needs them, and the per-input statistics in the files
    a ``stats_file`` parameter names (``stats_file.attach_stats_files``)."""

    def input_files(self, recipe: Any) -> dict[str, Path]:
        return {f"parameters.{p.name} file {f}": Path(f).expanduser()
                for p in recipe.method.params if p.stats_file for f in setting_files(recipe.parameters.get(p.name))}

    def plan(self, plan: Any) -> Optional[StatsPlan]:
        method = plan.recipe.method
        stats = None
        if method.needs_stats:
            stats = plan_statistics(plan.recipe, plan.models, method.needs_stats)
            stats.attach(plan)
        file_params = [p.name for p in method.params if p.stats_file]
        if file_params:
            attach_stats_files(plan, file_params)
        return stats


CALIBRATION = CalibrationSource()


def settings_for(recipe: Any, ref: str) -> CalibrationSettings:
    c = recipe.calibration
    return CalibrationSettings(tuple(c.files_for(ref)), c.samples, c.max_length, c.seed, c.batch_size, c.memory,
                               c.include_answers)


def plan_statistics(recipe: Any, models: list[Any], kinds: tuple[str, ...]) -> StatsPlan:
    """Where each input model's statistics are cached; reads task files, never a weight."""
    if recipe.calibration is None:
        raise InputError(f"{recipe.source_name}: merge_method {recipe.method.name} needs calibration data; "
                         "add a calibration: block with files:")
    cache = Path(recipe.calibration.cache_dir).expanduser() if recipe.calibration.cache_dir else default_cache_dir()
    inputs = set(recipe.input_models())
    problems: list[str] = []
    fingerprints: dict[tuple[str, ...], Optional[str]] = {}  # None: the files have problems
    out: list[Optional[ModelStats]] = []
    for model in models:
        if model.ref not in inputs:
            out.append(None)
            continue
        if isinstance(model.checkpoint, LoraCheckpoint):
            problems.append(f"{recipe.source_name}: {model.ref}: calibration of a LoRA-adapted model is not "
                            "supported; merge the adapter into the model first (mergesmith merge with linear)")
            out.append(None)
            continue
        runnable = model_type_problem(model.config, model.path / "config.json")  # calibration runs the model
        if runnable:
            problems.append(f"{recipe.source_name}: {runnable}")
            out.append(None)
            continue
        settings = settings_for(recipe, model.ref)
        if settings.files not in fingerprints:
            try:
                fingerprints[settings.files] = data_fingerprint(select_items(settings))
            except InputError as err:
                fingerprints[settings.files] = None  # said once, not once per model that reads these files
                problems += [f"{recipe.source_name}: calibration data: {p}" for p in err.problems]
        if fingerprints[settings.files] is None:
            out.append(None)
            continue
        folders = {k: cache / cache_key(k, [model.path], fingerprints[settings.files], settings.samples,
                                        settings.max_length, settings.seed, settings.include_answers)
                   for k in kinds if k != sequential.KIND}
        weight_bytes = sum(4 * _numel(info.shape) for info in model.checkpoint.infos.values())
        out.append(ModelStats(model.ref, model.path, settings, folders, model.config, weight_bytes))
    if problems:
        raise InputError(problems)
    if sequential.KIND in kinds:
        _joint_folders(recipe, out, fingerprints, cache)
    return StatsPlan(kinds, out)


def _joint_folders(recipe: Any, entries: list[Optional[ModelStats]], fingerprints: dict[tuple[str, ...], str],
                   cache: Path) -> None:
    """``gram_plusplus`` folders: each model's Grams depend on every model, all their data and the recipe."""
    inputs = [m for m in entries if m is not None]
    joint = json.dumps({"recipe": recipe.to_yaml(),
                        "data": [[m.ref, fingerprints[m.settings.files]] for m in inputs]}, sort_keys=True)
    for position, m in enumerate(inputs):
        data = hashlib.sha256(f"{joint}#{position}".encode()).hexdigest()
        s = m.settings
        m.folders[sequential.KIND] = cache / cache_key(sequential.KIND, [x.path for x in inputs], data, s.samples,
                                                       s.max_length, s.seed, s.include_answers)


def calibrate_model(path: Path, settings: CalibrationSettings, kinds: list[str], folders: dict[str, Path], *,
                    device: str = "cpu", progress: bool = True, label: str = "") -> dict[str, Path]:
    """Run the model at ``path`` on its calibration data and write each kind of statistic to its folder.

    Allocations of 1 MiB or more are mapped and returned on free meanwhile (``malloc.mapped_allocations``),
    so that hundreds of passes do not fragment the heap into a higher peak."""
    with mapped_allocations():
        return _calibrate_model(path, settings, kinds, folders, device, progress, label)


def _calibrate_model(path: Path, settings: CalibrationSettings, kinds: list[str], folders: dict[str, Path],
                     device: str, progress: bool, label: str) -> dict[str, Path]:
    from mergesmith.evaluate.model import load_model

    lm = load_model(path, device=device, dtype="float32", max_length=settings.max_length)
    try:
        sequences = encode_items(lm, select_items(settings), settings.max_length, settings.include_answers)
        if not sequences:
            raise InputError(f"{', '.join(settings.files)}: the calibration data gives no tokens; give prompts")
        tokens = token_count(sequences)
        memory = settings.accumulator_bytes(sum(4 * p.numel() for p in lm.model.parameters()))
        done: dict[str, Path] = {}
        for kind in kinds:
            start = time.perf_counter()
            bar = tqdm(total=tokens, unit="tok", desc=f"{kind} {label or path.name}", disable=not progress)

            def tick(n: int, passes: int) -> None:
                if bar.total != tokens * passes:
                    bar.total = tokens * passes
                bar.update(n)

            folders[kind].parent.mkdir(parents=True, exist_ok=True)
            writer = EntryWriter(folders[kind])
            try:
                if kind == "gram":
                    written = collect_grams(lm, sequences, settings.batch_size, memory, writer.tmp, tick)
                elif kind == "fisher":
                    written = collect_fisher(lm, sequences, settings.seed, memory, writer.tmp, tick)
                else:
                    raise ValueError(f"unknown statistic {kind!r}; known: {', '.join(KINDS)}")
            except BaseException:
                writer.abort()
                raise
            finally:
                bar.close()
            index = {"kind": kind, "model": str(path), "tensors": written.tensors, "counts": written.counts,
                     "sequences": len(sequences), "tokens": tokens, "passes": written.passes,
                     "settings": {"files": list(settings.files), "samples": settings.samples,
                                  "max_length": settings.max_length, "seed": settings.seed,
                                  "include_answers": settings.include_answers},
                     "seconds": round(time.perf_counter() - start, 3)}
            if kind == "fisher":
                index["fisher_norm"] = written.sum_of_squares ** 0.5
            done[kind] = writer.commit(index)
        return done
    finally:
        del lm
        gc.collect()


def calibration_peak_bytes(entry: ModelStats, kinds: tuple[str, ...]) -> int:
    """About the most memory computing one model's statistics takes (docs/calibrate.md).

    The model in float32 + the accumulators of one pass (the budget, or all of them
    when they fit, or the largest single one when it alone is larger) + activations:
    for Grams one batch's forward up to the pass's last site (never the logits), for
    Fisher one sequence's forward and backward (about 16 floats per hidden unit per
    layer and token, plus the logits); for Fisher the budget covers the sums and the
    dense gradient in flight together.
    """
    cfg = entry.config.get("text_config") or entry.config
    h = int(cfg.get("hidden_size", 0))
    i = int(cfg.get("intermediate_size", 4 * h))
    layers = int(cfg.get("num_hidden_layers", 0))
    vocab = int(cfg.get("vocab_size", 0))
    s = entry.settings
    budget = s.accumulator_bytes(entry.weight_bytes)
    worst = 0
    for kind in kinds:
        if kind == "gram":
            all_acc = (layers * (3 * h * h + i * i) + h * h) * 8
            acc = min(all_acc, max(budget, max(h, i) ** 2 * 8))
            act = s.batch_size * s.max_length * (4 * h + 3 * i) * 4
        else:
            # The sums and the largest dense gradient fit the budget together; an untied vocabulary
            # matrix has no dense gradient (collect.vocabulary_modules).
            largest = 4 * max(vocab * h, h * i)
            dense = largest if cfg.get("tie_word_embeddings", True) else 4 * h * i
            acc = min(entry.weight_bytes + dense, max(budget, largest + dense))
            act = s.max_length * (layers * (16 * h + 4 * i) + 3 * vocab) * 4
        worst = max(worst, entry.weight_bytes + acc + act)
    return worst


def _numel(shape: Any) -> int:
    n = 1
    for d in shape:
        n *= d
    return n

