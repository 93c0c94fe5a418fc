"""A multi-stage recipe file read into stages, and its structure checked.

The format is mergekit-multi's: YAML documents separated by ``---``, each one an ordinary
merge recipe plus a ``name:``. A recipe refers to an earlier stage's output by writing its
name where a model goes (``base_model``, ``models[i].model``, ``slices[i].sources[j].model``,
``slices[i].base_model``, ``tokenizer_source``, ``tokenizer.source``), also as ``name+adapter``
(the stage's output with a LoRA adapter folded in, as ``model+adapter`` everywhere else) or in
mergekit's mapping form ``{model: {path: name}, lora: {path: adapter}}``. Exactly one document
has no ``name:``: the final stage, written to the output folder.

The checks here need no model folder: names (present, unique, usable as a folder name),
one final stage, references to stages that exist and come earlier in the file (a reference
to a later stage is refused, and a chain of them that closes on itself is named as a cycle),
an adapter part that names a stage (a stage makes a full model, not an adapter), and stages
the final stage never reads (a warning: they are not run). ``check_stages`` returns every
problem of the file, for ``plan.plan_multi`` to report with each stage's own in one
``InputError``; ``read_stages`` raises them.
"""

from __future__ import annotations

import copy
import difflib
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import yaml

from mergesmith.errors import InputError, read_text

# A stage's name becomes part of a folder name; a name with '+' would read as model+adapter.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_KEYWORDS = ("base", "union")  # tokenizer_source values that are not models


@dataclass
class Stage:
    """One document of the file: a recipe (without ``name:``) and the stages it reads."""

    name: Optional[str]  # None: the final stage
    document: int  # 1-based position in the file
    raw: dict[str, Any]
    label: str  # how messages cite it: "multi.yml: stage 'mix' (document 2)"
    uses: list[str] = field(default_factory=list)  # earlier stages it reads, first mention first
    unknown: set[str] = field(default_factory=set)  # references that are neither a stage nor a path

    @property
    def title(self) -> str:
        return f"stage {self.name!r}" if self.name is not None else "the final stage"


# ----------------------------------------------------------------------------- references


def map_references(raw: dict[str, Any], change: Callable[[str, str, Optional[str]], str]) -> dict[str, Any]:
    """A copy of the recipe ``raw`` with every model reference replaced by ``change(field, model,
    adapter)`` (a string reference; ``adapter`` None when there is none). Entries of a shape the
    recipe schema refuses are left alone: its check reports them."""
    out = copy.deepcopy(raw)

    def fix(holder: Any, key: Any, where: str) -> None:
        if not isinstance(holder, (dict, list)):
            return
        if isinstance(holder, dict) and key not in holder:
            return
        value = holder[key]
        if isinstance(value, str) and value and value not in _KEYWORDS:
            model, plus, adapter = value.partition("+")
            holder[key] = change(where, model.strip(), adapter.strip() if plus else None)
        elif isinstance(value, dict) and set(value) <= {"model", "lora"} and isinstance(value.get("model"), dict) \
                and isinstance(value["model"].get("path"), str):
            lora = value.get("lora")
            adapter = lora.get("path") if isinstance(lora, dict) else lora
            holder[key] = change(where, value["model"]["path"], adapter if isinstance(adapter, str) else None)

    fix(out, "base_model", "base_model")
    fix(out, "tokenizer_source", "tokenizer_source")
    if isinstance(out.get("tokenizer"), dict):
        fix(out["tokenizer"], "source", "tokenizer.source")
    for i, entry in enumerate(_dicts(out.get("models"))):
        fix(entry, "model", f"models[{i}].model")
    for i, sl in enumerate(_dicts(out.get("slices"))):
        fix(sl, "base_model", f"slices[{i}].base_model")
        for j, src in enumerate(_dicts(sl.get("sources"))):
            fix(src, "model", f"slices[{i}].sources[{j}].model")
    return out


def references(raw: dict[str, Any]) -> Iterator[tuple[str, str, Optional[str]]]:
    """Every model reference of a recipe: (field, model, adapter or None)."""
    found: list[tuple[str, str, Optional[str]]] = []

    def keep(where: str, model: str, adapter: Optional[str]) -> str:
        found.append((where, model, adapter))
        return model if adapter is None else f"{model}+{adapter}"

    map_references(raw, keep)
    return iter(found)


def _dicts(value: Any) -> list[dict]:
    return [e for e in value if isinstance(e, dict)] if isinstance(value, list) else []


# ----------------------------------------------------------------------------- reading and checks


def read_stages(path: str | Path) -> list[Stage]:
    """The stages of a multi-stage recipe file, in file order, checked as a whole (no model folder
    is opened here). Raises one ``InputError`` with every problem; warns about unused stages."""
    stages, problems = check_stages(path)
    if problems:
        raise InputError(problems)
    warn_unused(stages)
    return stages


def warn_unused(stages: list[Stage]) -> None:
    for stage in unused_stages(stages):
        warnings.warn(f"{stage.label}: is not read by the final stage, directly or through another stage; "
                      "it is not run (remove it, or refer to it by name)", stacklevel=3)


def check_stages(path: str | Path) -> tuple[list[Stage], list[str]]:
    """The stages of the file and every problem of its structure (names, the final stage, references
    between stages), for the caller to report with each stage's own problems. Raises ``InputError``
    only when there are no stages to check: no such file, not YAML, no document."""
    where = str(path)
    if not Path(path).is_file():
        raise InputError(f"{where}: no such multi-stage recipe file" if not Path(path).exists()
                         else f"{where}: not a file")
    try:
        docs = list(yaml.safe_load_all(read_text(path)))
    except yaml.YAMLError as err:
        raise InputError(f"{where}: not valid YAML ({str(err).splitlines()[0]})") from None

    problems: list[str] = []
    stages: list[Stage] = []
    for number, doc in enumerate(docs, start=1):
        if doc is None:  # an empty document, e.g. after a trailing ---
            continue
        if not isinstance(doc, dict):
            problems.append(f"{where}: document {number} is not a mapping; each document is a merge recipe "
                            "with a name: (the final one without)")
            continue
        raw = dict(doc)
        name = raw.pop("name", None)
        label = f"{where}: stage {name!r} (document {number})" if name is not None \
            else f"{where}: the final stage (document {number})"
        if name is not None and (not isinstance(name, str) or not _NAME_RE.match(name) or name in _KEYWORDS):
            problems.append(f"{where}: document {number}: name = {name!r} must be a word of letters, digits, "
                            "'.', '_' or '-' (it names the stage's folder), and not base or union")
            name = str(name)
        stages.append(Stage(name, number, raw, label))
    if not stages and not problems:
        raise InputError(f"{where}: holds no recipe; write one YAML document per stage, separated by ---")

    problems += _name_problems(where, stages)
    problems += _reference_problems(stages)
    return stages, problems


def _name_problems(where: str, stages: list[Stage]) -> list[str]:
    problems = []
    finals = [s for s in stages if s.name is None]
    if not finals:
        problems.append(f"{where}: no final stage; give exactly one document no name: (its output is written "
                        "to the output folder)")
    elif len(finals) > 1:
        problems.append(f"{where}: documents {', '.join(str(s.document) for s in finals)} have no name:; only "
                        "the final stage goes without a name; name the others")
    seen: dict[str, Stage] = {}
    for s in stages:
        if s.name is None:
            continue
        if s.name in seen:
            problems.append(f"{s.label}: name {s.name!r} is already the name of document {seen[s.name].document}; "
                            "give every stage its own name")
        else:
            seen[s.name] = s
    return problems


def _reference_problems(stages: list[Stage]) -> list[str]:
    """References to stages: each must come earlier; fills ``Stage.uses``."""
    position = {}
    for k, s in enumerate(stages):
        if s.name is not None:
            position.setdefault(s.name, k)
    problems = []
    refers: dict[str, set[str]] = {}  # stage -> every stage it names (for naming cycles)
    later: dict[str, set[str]] = {}  # stage -> the stages it names that do not come before it
    for k, stage in enumerate(stages):
        for where, model, adapter in references(stage.raw):
            if adapter is not None and adapter in position:
                problems.append(f"{stage.label}: {where} = '{model}+{adapter}': {adapter!r} is a stage, which makes "
                                "a full model, not a LoRA adapter; after '+' give an adapter folder")
            if model not in position:
                if "/" not in model and not Path(model).expanduser().exists():
                    close = difflib.get_close_matches(model, list(position), n=1)
                    hint = f" (did you mean stage {close[0]!r}?)" if close else ""
                    problems.append(f"{stage.label}: {where} = {model!r} is neither a stage{hint} nor a model "
                                    "folder; check the name")
                    stage.unknown.add(model)
                continue
            if Path(model).expanduser().is_dir():
                warnings.warn(f"{stage.label}: {where} = {model!r} names a stage and a folder; it means the stage "
                              f"(write ./{model} for the folder)", stacklevel=3)
            refers.setdefault(stage.name or "", set()).add(model)
            if position[model] >= k:
                later.setdefault(stage.name or "", set()).add(model)
            elif model not in stage.uses:
                stage.uses.append(model)
    in_cycle: set[tuple[str, str]] = set()  # the references that close a cycle, reported with it
    for cycle in _cycles(refers):
        in_cycle.update(zip(cycle, cycle[1:] + cycle[:1]))
        problems.append(f"{stages[position[cycle[0]]].label}: the stages refer to each other in a cycle "
                        f"({' -> '.join(cycle + [cycle[0]])}); a stage can only read stages before it")
    for stage in stages:
        for model in sorted(later.get(stage.name or "", ())):
            if (stage.name, model) not in in_cycle:
                problems.append(f"{stage.label}: refers to stage {model!r} (document "
                                f"{stages[position[model]].document}), which does not come before it; stages run "
                                f"in file order, so move {model!r} above it")
    return problems


def _cycles(refers: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle of stages referring to each other (a stage naming itself is one), each once,
    starting at its first stage in file order. The graphs are a handful of stages, so a plain
    depth-first walk from every stage is enough."""
    cycles: list[list[str]] = []
    seen: set[frozenset[str]] = set()
    for start in refers:
        stack = [(start, [start])]
        while stack:
            node, trail = stack.pop()
            for nxt in sorted(refers.get(node, ())):
                if nxt == start:
                    if frozenset(trail) not in seen:
                        seen.add(frozenset(trail))
                        cycles.append(trail)
                elif nxt not in trail:
                    stack.append((nxt, trail + [nxt]))
    return cycles


def unused_stages(stages: list[Stage]) -> list[Stage]:
    """The named stages the final stage does not read, directly or through other stages."""
    by_name = {s.name: s for s in stages}
    needed: set[Optional[str]] = set()
    todo = [s for s in stages if s.name is None]
    while todo:
        stage = todo.pop()
        if stage.name in needed:
            continue
        needed.add(stage.name)
        todo += [by_name[n] for n in stage.uses if n in by_name]
    return [s for s in stages if s.name not in needed]
