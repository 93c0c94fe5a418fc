"""A multi-stage recipe planned: each stage's recipe with stage names turned into folders, its
cache key, whether its output is cached, and every problem of every stage found before any
stage runs.

The cache key of a stage is the SHA-256 of

- the stage's recipe, as written, with each reference to an earlier stage replaced by that
  stage's key (so a change anywhere upstream changes every key downstream);
- the identity of every other input: each model folder and LoRA adapter folder, as its
  resolved path and every file's name, size and modification time in nanoseconds (the identity
  calibrate's statistics cache uses: re-saving or editing a model changes it; reading it
  does not), and each calibration data or statistics file the same way;
- the merge options that can change a tensor (device, ``--random-seed``, ``--vocab-mismatch``,
  ``--allow-nonfinite``) and mergesmith's version; not those that only lay the output out
  (shard size, prefetch, row blocks, threads).

A stage's output lives in ``INTERMEDIATE_DIR/NAME-KEY16``; it is cached when that folder
exists, which the atomic writer allows only for a finished model. mergekit-multi instead
reuses a stage whenever a folder of the stage's name holds a config and weights, so an edited
stage or a changed input silently reuses the stale intermediate; here the key changes and the
stage runs again, as does every stage that reads it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Union

from mergesmith._version import __version__
from mergesmith.api import plan_merge
from mergesmith.calibrate import CALIBRATION
from mergesmith.calibrate.store import model_identity
from mergesmith.engine.models import open_models, resolve_model_path
from mergesmith.engine.options import MergeOptions, option_problems
from mergesmith.engine.plan import calibration_files
from mergesmith.errors import InputError
from mergesmith.multistage.stages import (Stage, check_stages, map_references, references, unused_stages,
                                          warn_unused)
from mergesmith.paths import output_problems
from mergesmith.recipe import load_recipe

KEY_FORMAT = 1


@dataclass
class StagePlan:
    stage: Stage
    recipe: dict[str, Any]  # the stage's recipe, stage names replaced by their folders
    key: str  # hex SHA-256 (see the module docstring)
    out_dir: Path
    cached: bool  # the output exists already (an intermediate from an earlier run, kept)
    inputs: list[str]  # what it reads, for people: "stage 'ab' (key 3f2a...)" or a folder
    method: str = "?"
    checked: str = ""  # how far it was checked before the run: "tensor by tensor" or "recipe and models"

    @property
    def final(self) -> bool:
        return self.stage.name is None


@dataclass
class MultiPlan:
    source: str
    stages: list[StagePlan]  # the stages to run or reuse, in file order, the final one last
    unused: list[Stage]
    out_dir: Path
    intermediate_dir: Path
    keep_intermediates: bool

    def describe(self) -> str:
        keep = "kept (--keep-intermediates)" if self.keep_intermediates else \
            "removed after the run (--keep-intermediates keeps them, and later runs reuse them)"
        lines = [f"{self.source}: {len(self.stages)} stages; intermediates in {self.intermediate_dir}, {keep}"]
        for k, sp in enumerate(self.stages, start=1):
            state = "final, writes" if sp.final else ("cached at" if sp.cached else "to run, writes")
            lines.append(f"{k}. {sp.stage.title} (document {sp.stage.document}): {sp.method}, key {sp.key[:16]}, "
                         f"{state} {sp.out_dir}")
            for entry in sp.inputs:
                lines.append(f"     reads {entry}")
            if sp.checked:
                lines.append(f"     checked: {sp.checked}")
        for stage in self.unused:
            lines.append(f"not run: {stage.title} (document {stage.document}), which the final stage does not read")
        return "\n".join(lines)


def default_intermediate_dir(out_dir: Union[str, Path]) -> Path:
    """``OUT.stages`` beside the output: on the output's disk, and named after it."""
    out = Path(out_dir)
    return out.parent / f"{out.name}.stages"


def plan_multi(path: Union[str, Path], out_dir: Union[str, Path], options: Optional[MergeOptions] = None, *,
               intermediate_dir: Optional[Union[str, Path]] = None, keep_intermediates: bool = False,
               writing: bool = False) -> MultiPlan:
    """Read, key and check every stage of a multi-stage recipe file; raise one ``InputError`` with
    every problem of every stage (and of the output paths) before anything runs.

    A stage whose inputs all exist (model folders, cached intermediates) is planned tensor by
    tensor (``api.plan_merge``: configs and headers, never a weight). A stage that reads an
    intermediate not made yet has its recipe checked and its other models opened (headers);
    it is planned tensor by tensor just before it runs, still before any of its weights is read.
    """
    options = options or MergeOptions()
    out_dir = Path(out_dir)
    inter = Path(intermediate_dir) if intermediate_dir is not None else default_intermediate_dir(out_dir)
    stages, problems = check_stages(path)
    problems += option_problems(options)
    unused = unused_stages(stages)
    plans: dict[str, StagePlan] = {}
    external: dict[str, Path] = {}  # every model and adapter folder any stage reads, by reference
    # Each stage is checked even when the file's structure has problems, so that all come at once;
    # a reference that is a stage but not an earlier one, or nothing at all, is not opened as a folder.
    skip = {s.name for s in stages if s.name is not None}.union(*(s.unknown for s in stages))
    for stage in stages:
        problems += _plan_stage(stage, plans, options, out_dir, inter, external, skip)
    problems += output_problems(inter, {**external, f"the recipe {path}": Path(path)}, "intermediate folder")
    problems += output_problems(out_dir, {**external, f"the recipe {path}": Path(path),
                                          "the intermediate folder": inter})
    if writing and out_dir.exists() and not options.overwrite:
        problems.append(f"{out_dir}: already exists; choose another output directory or pass --overwrite")
    if problems:
        raise InputError(list(dict.fromkeys(problems)))
    warn_unused(stages)
    run = [plans[s.name or ""] for s in stages if s not in unused]
    return MultiPlan(str(path), run, unused, out_dir, inter, keep_intermediates)


def _plan_stage(stage: Stage, plans: dict[str, StagePlan], options: MergeOptions, out_dir: Path, inter: Path,
                external: dict[str, Path], skip: set[str]) -> list[str]:
    """Key and check one stage (the stages before it are in ``plans``; it is added); its problems."""
    inputs: list[str] = []

    def to_folder(where: str, model: str, adapter: Optional[str]) -> str:
        upstream = plans[model] if model in stage.uses else None
        if upstream:
            inputs.append(f"{upstream.stage.title} (key {upstream.key[:16]}): {upstream.out_dir}")
        folder = str(upstream.out_dir) if upstream else model
        return folder if adapter is None else f"{folder}+{adapter}"

    def to_key(where: str, model: str, adapter: Optional[str]) -> str:
        ref = f"stage:{plans[model].key}" if model in stage.uses else model
        return ref if adapter is None else f"{ref}+{adapter}"

    recipe = map_references(stage.raw, to_folder)
    upstream_folders = {str(plans[n].out_dir) for n in stage.uses}
    with labelled(stage.label) as caught:
        method, identities = _check_recipe_and_inputs(recipe, upstream_folders, skip, external, inputs, caught)
    problems = caught.problems

    record = {"format": KEY_FORMAT, "mergesmith": __version__, "recipe": map_references(stage.raw, to_key),
              "inputs": identities, "options": {"device": options.device, "random_seed": options.random_seed,
                                                "vocab_mismatch": options.vocab_mismatch,
                                                "allow_nonfinite": options.allow_nonfinite}}
    key = hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()
    final = stage.name is None
    folder = out_dir if final else inter / f"{stage.name}-{key[:16]}"
    cached = not final and (folder / "config.json").is_file()
    plan = StagePlan(stage, recipe, key, folder, cached, list(dict.fromkeys(inputs)), method)
    plans[stage.name or ""] = plan
    if problems or cached:
        return problems

    # Planned tensor by tensor now where every input exists: the engine's full checks, all at once.
    # Not where a reference is already a problem (a later stage's name, or nothing at all). The
    # output paths were checked above, for every stage at once.
    waiting = [n for n in stage.uses if not plans[n].cached]
    if any(model in skip or adapter in skip for _, model, adapter in references(recipe)):
        return problems
    if waiting:
        plan.checked = f"recipe and model headers; tensor by tensor once {', '.join(map(repr, waiting))} exists"
        return problems
    with labelled(stage.label) as caught:
        try:
            merge_plan = plan_merge(recipe, options)
            for m in merge_plan.models:
                m.checkpoint.close()
            plan.checked = f"tensor by tensor ({len(merge_plan.tensors)} output tensors)"
        except InputError as err:
            caught += err.problems
    return problems + caught.problems


def _check_recipe_and_inputs(recipe: dict[str, Any], upstream: set[str], skip: set[str], external: dict[str, Path],
                             inputs: list[str], caught: "_Caught") -> tuple[str, dict[str, Any]]:
    """A stage's recipe checked and every input that is not an earlier stage opened (headers only);
    the problems go to ``caught``, the folders to ``external`` and ``inputs``. Returns the method's
    name and the identity of every outside input (folders, calibration and statistics files)."""
    loaded = None
    try:
        loaded = load_recipe(recipe)
    except InputError as err:
        caught += err.problems
    refs, adapters = _outside_inputs(recipe, upstream, skip)
    models, model_problems, paths = open_models(refs, "recipe")
    for m in models:
        m.checkpoint.close()
    caught += model_problems
    # An adapter on an earlier stage's output is opened with that output when the stage runs; here
    # its folder is found, and it is part of the key.
    for adapter in adapters:
        try:
            paths[adapter] = resolve_model_path(adapter)
        except InputError as err:
            caught += [f"recipe: {p}" for p in err.problems]
    external.update(paths)
    identities: dict[str, Any] = {}
    for ref, folder in sorted(paths.items()):
        identities[f"model {ref}"] = model_identity([folder])
        inputs.append(f"{ref} ({folder})" if str(folder) != ref else ref)
    if loaded is None:
        return "?", identities
    files = {**calibration_files(loaded), **CALIBRATION.input_files(loaded)}
    identities.update({label: _file_identity(p) for label, p in files.items()})
    return loaded.method.name, identities


def _outside_inputs(recipe: dict[str, Any], upstream: set[str], skip: set[str]) -> tuple[list[str], list[str]]:
    """The references of a recipe (earlier stages' names already replaced by their folders) that are
    not earlier stages, as ``open_models`` takes them, and the adapters folded into an earlier
    stage's output; ``skip``: references already reported (other stages, unknown names)."""
    refs: dict[str, None] = {}
    adapters: dict[str, None] = {}
    for _, model, adapter in references(recipe):
        if model in skip:
            continue
        if adapter in skip:  # a stage after '+': reported already; the model is still opened
            adapter = None
        if model in upstream:
            if adapter is not None:
                adapters[adapter] = None
        else:
            refs[model if adapter is None else f"{model}+{adapter}"] = None
    return list(refs), list(adapters)


def _file_identity(path: Path) -> Any:
    try:
        st = os.stat(path)
        return [str(Path(path).resolve()), st.st_size, st.st_mtime_ns]
    except OSError:
        return [str(path), None, None]  # load_recipe reports a missing file


class _Caught:
    def __init__(self) -> None:
        self.problems: list[str] = []

    def __iadd__(self, problems: list[str]) -> "_Caught":
        self.problems += problems
        return self


@contextlib.contextmanager
def labelled(label: str) -> Iterator[_Caught]:
    """Problems and warnings of one stage, cited by the stage instead of by ``recipe`` (the name
    the engine gives a recipe handed over as a mapping). Problems added to the yielded list, and
    come out relabelled; warnings are shown when the block ends."""
    caught = _Caught()
    shown: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as shown:
            warnings.simplefilter("always")
            yield caught
    finally:
        caught.problems = [relabel(p, label) for p in caught.problems]
        for w in shown:
            warnings.warn_explicit(relabel(str(w.message), label), w.category, w.filename, w.lineno)


def relabel(problem: str, label: str) -> str:
    if problem.startswith(label):
        return problem
    if problem.startswith("recipe: "):
        return f"{label}: {problem[len('recipe: '):]}"
    return f"{label}: {problem}"
