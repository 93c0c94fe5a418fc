"""The search space: a recipe with ranges, or mergekit-evolve's ``genome:`` configuration.

Our syntax is an ordinary recipe in which some settings are searched::

    merge_method: {choice: [ties, task_arithmetic]}
    base_model: zoo/base
    models:
      - model: zoo/experts/facts
        parameters: {weight: {range: [0, 1]}, density: {range: [0.1, 1]}}
      - model: zoo/experts/count
        include: {choice: [true, false]}      # model selection: kept or dropped
        parameters: {weight: {range: [0, 1]}, density: 0.5}
    parameters: {lambda: {range: [0.5, 1.5]}}
    layer_groups: 2       # every range becomes 2 genes, written as a gradient over the layers
    tasks: [val/facts.jsonl, {name: val/count.jsonl, weight: 2}]

``{range: [low, high]}`` and ``{choice: [...]}`` may stand for ``merge_method``, a
model's ``include``, and any value under a ``parameters:`` mapping (also inside
filter lists and slices). Parameters that the chosen method does not declare are
left out of the candidate's recipe, so one space can offer methods with different
parameters.

Every optimizer works in the unit cube: a candidate is a vector ``u`` in
``[0, 1]^d`` with one coordinate per gene; a range maps ``u`` linearly onto
``[low, high]``, a choice of ``k`` options takes option ``floor(u k)``.

A ``genome:`` configuration (mergekit-evolve) is translated into this syntax,
see ``genome_to_space``.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from mergesmith.errors import InputError, read_text

RECIPE_KEYS = {"merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype",
               "tokenizer_source", "tokenizer", "chat_template", "random_seed", "name", "modules"}
SPACE_KEYS = {"tasks", "layer_groups", "limit"}
# mergekit-evolve's top-level keys beside genome/tasks/limit; accepted, and said to be ignored.
EVOLVE_IGNORED = {"num_fewshot", "shuffle", "random_init", "apply_chat_template", "fewshot_as_multiturn"}
GENOME_KEYS = {"models", "merge_method", "base_model", "tokenizer_source", "layer_granularity", "normalize",
               "allow_negative_weights", "filters", "smooth"}
# What mergekit-evolve searches for each method it supports.
GENOME_PARAMS = {"linear": ("weight",), "task_arithmetic": ("weight",), "ties": ("weight", "density"),
                 "dare_ties": ("weight", "density")}
GENOME_NEEDS_BASE = {"task_arithmetic", "ties", "dare_ties"}
# Densities are searched from here up: a density of 0 keeps nothing of a model (and our methods refuse it).
GENOME_DENSITY_LOW = 0.05


@dataclass
class Gene:
    """One searched coordinate: where it sits in the recipe and what values it takes."""

    name: str  # readable, e.g. "facts.weight" or "facts.weight@1" (layer group 1)
    path: tuple  # keys and indices into the raw recipe
    low: Optional[float] = None  # a range ...
    high: Optional[float] = None
    choices: Optional[list] = None  # ... or a choice
    group: Optional[int] = None  # layer group: the path holds a gradient list, this is entry `group`
    groups: int = 1

    def value(self, u: float) -> Any:
        u = min(max(float(u), 0.0), 1.0)
        if self.choices is not None:
            return self.choices[min(int(u * len(self.choices)), len(self.choices) - 1)]
        assert self.low is not None and self.high is not None
        return self.low + u * (self.high - self.low)

    def unit(self, value: Any) -> float:
        """The ``u`` that decodes to ``value`` (the middle of a choice's interval)."""
        if self.choices is not None:
            return (self.choices.index(value) + 0.5) / len(self.choices)
        assert self.low is not None and self.high is not None
        return (float(value) - self.low) / (self.high - self.low)


@dataclass
class TaskSpec:
    name: str  # a task file (resolved against the space file's folder) or an lm-eval task name
    weight: float = 1.0


@dataclass
class SearchSpace:
    template: dict[str, Any]  # the recipe with markers still in it
    genes: list[Gene]
    tasks: list[TaskSpec] = field(default_factory=list)
    limit: Optional[int] = None  # items per task for the fitness subsample (mergekit-evolve's limit)
    source: str = "space"
    notes: list[str] = field(default_factory=list)

    @property
    def dim(self) -> int:
        return len(self.genes)

    def decode(self, u: Any) -> dict[str, Any]:
        """Gene values (by name) for a unit vector; model selection always keeps one model."""
        values = {g.name: g.value(x) for g, x in zip(self.genes, u)}
        includes = [(x, g) for g, x in zip(self.genes, u) if g.path[-1] == "include"]
        base = self.template.get("base_model")
        fixed_in = any(isinstance(e, dict) and e.get("include", True) is True and e.get("model") != base
                       for e in _listed(self.template.get("models")))
        if includes and not fixed_in and not any(values[g.name] for _, g in includes):
            values[max(includes, key=lambda p: p[0])[1].name] = True
        return values

    def recipe(self, values: dict[str, Any]) -> dict[str, Any]:
        """The plain recipe (no markers) these gene values make; ``mergesmith merge`` runs it."""
        raw = copy.deepcopy(self.template)
        for gene in self.genes:
            if gene.group is None:
                _set(raw, gene.path, values[gene.name])
            else:
                current = _get(raw, gene.path)
                if not isinstance(current, list):
                    current = [None] * gene.groups
                    _set(raw, gene.path, current)
                current[gene.group] = values[gene.name]
        for key in SPACE_KEYS:
            raw.pop(key, None)
        if isinstance(raw.get("models"), list):
            raw["models"] = [m for m in raw["models"] if not (isinstance(m, dict) and m.get("include") is False)]
            for m in raw["models"]:
                if isinstance(m, dict):
                    m.pop("include", None)
        _keep_method_params(raw)
        return _plain(raw)

    def model_refs(self) -> list[str]:
        """Every model the space names (base first), as written."""
        refs: dict[str, None] = {}
        if isinstance(self.template.get("base_model"), str):
            refs[self.template["base_model"]] = None
        entries = _listed(self.template.get("models"))
        for sl in _listed(self.template.get("slices")):
            entries += _listed(sl.get("sources")) if isinstance(sl, dict) else []
        for e in entries:
            if isinstance(e, dict) and isinstance(e.get("model"), str):
                refs[e["model"]] = None
        return list(refs)

    def midpoint(self) -> list[float]:
        return [0.5] * self.dim


# ----------------------------------------------------------------------------- loading


def load_space(path: Union[str, Path, dict], *, base_dir: Optional[Path] = None) -> SearchSpace:
    """Read and check a space (our syntax or a mergekit-evolve configuration). Raises InputError with every problem."""
    if isinstance(path, dict):
        raw, where, folder = copy.deepcopy(path), "space", base_dir or Path.cwd()
    else:
        p = Path(path)
        where, folder = str(p), p.parent
        if not p.is_file():
            raise InputError(f"{where}: no such search space file")
        try:
            raw = yaml.safe_load(read_text(p))
        except yaml.YAMLError as err:
            raise InputError(f"{where}: not valid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise InputError(f"{where}: a search space is a YAML mapping: a recipe with ranges, or "
                             "mergekit-evolve's genome: and tasks:")
    problems: list[str] = []
    notes: list[str] = []
    if "genome" in raw:
        raw = genome_to_space(raw, where, problems, notes)
        if problems and not raw:  # nothing was translated: checking an empty space would only add noise
            raise InputError(problems)
    space = _parse(raw, where, problems)
    if problems:
        raise InputError(problems)
    space.notes = notes
    for t in space.tasks:
        candidate = folder / t.name
        if not os.path.isabs(t.name) and candidate.exists():
            t.name = str(candidate)
    return space


def is_search_space(raw: Any) -> bool:
    """Whether a parsed recipe file is a search space rather than a plain recipe: it has mergekit-evolve's
    ``genome:``, a space-only key (``tasks``, ``layer_groups``, ``limit``), or a ``{range: ...}`` /
    ``{choice: [...]}`` marker anywhere. No mergekit recipe has any of these, so the answer is never
    ambiguous; a malformed space still counts as one, so that its problems are reported as a space's."""
    if not isinstance(raw, dict):
        return False
    if "genome" in raw or SPACE_KEYS & set(raw):
        return True

    def marked(node: Any) -> bool:
        if isinstance(node, dict):
            return _is_marker(node) or any(marked(v) for v in node.values())
        if isinstance(node, list):
            return any(marked(v) for v in node)
        return False

    return marked(raw)


def read_space_raw(path: Union[str, Path, dict]) -> Any:
    """The YAML of a recipe-or-space file as data (None when it cannot be read: its own loader says why)."""
    if isinstance(path, dict):
        return path
    try:
        return yaml.safe_load(read_text(Path(path)))
    except (OSError, InputError, yaml.YAMLError, UnicodeDecodeError):
        return None


def _parse(raw: dict[str, Any], where: str, problems: list[str]) -> SearchSpace:
    for key in raw:
        if key not in RECIPE_KEYS | SPACE_KEYS:
            problems.append(f"{where}: unknown key {key!r}; a space holds a recipe's keys and tasks, "
                            "layer_groups, limit")
    groups = raw.get("layer_groups", 1)
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        problems.append(f"{where}: layer_groups = {groups!r} must be a whole number, at least 1")
        groups = 1
    genes: list[Gene] = []
    _collect(raw, (), where, groups, genes, problems)
    tasks = _tasks(raw.get("tasks"), where, problems)
    limit = raw.get("limit")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        problems.append(f"{where}: limit = {limit!r} must be a whole number of items per task, at least 1")
        limit = None
    space = SearchSpace(raw, genes, tasks, limit, where)
    label_models(space)
    problems += _method_problems(space, where)
    if not genes and not problems:
        problems.append(f"{where}: nothing to search: mark at least one setting with {{range: [low, high]}} "
                        "or {choice: [...]}")
    return space


def _collect(node: Any, path: tuple, where: str, groups: int, genes: list[Gene], problems: list[str]) -> None:
    """Find every marker under ``node``; check where it stands and what it holds."""
    if isinstance(node, dict) and _is_marker(node):
        field_name = _path_text(path)
        allowed = path == ("merge_method",) or "parameters" in path or (path and path[-1] == "include")
        if not allowed:
            problems.append(f"{where}: {field_name}: ranges and choices are searched only in merge_method, "
                            "include and parameters")
            return
        gene = _marker_gene(node, path, where, problems)
        if gene is None:
            return
        if gene.choices is None and groups > 1 and "parameters" in path:
            genes.extend(Gene(f"{gene.name}@{k}", path, gene.low, gene.high, None, k, groups) for k in range(groups))
        else:
            genes.append(gene)
        return
    if isinstance(node, dict):
        if "include" in node and path[:1] != ("models",):
            problems.append(f"{where}: {_path_text(path + ('include',))}: include (model selection) belongs to "
                            "an entry of models:")
        for key, value in node.items():
            if path == () and key == "tasks":
                continue
            _collect(value, path + (key,), where, groups, genes, problems)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _collect(value, path + (i,), where, groups, genes, problems)


def _is_marker(node: dict) -> bool:
    return bool(node) and set(node) <= {"range", "choice"}


def _marker_gene(node: dict, path: tuple, where: str, problems: list[str]) -> Optional[Gene]:
    field_name = _path_text(path)
    name = _path_text(path)  # label_models renames it after the model's folder where it can
    if len(node) != 1:
        problems.append(f"{where}: {field_name}: give either range or choice, not both")
        return None
    if "range" in node and (path == ("merge_method",) or path[-1] == "include"):
        takes = "a list of method names" if path == ("merge_method",) else "[true, false]"
        problems.append(f"{where}: {field_name}: range searches numbers; give choice: {takes}")
        return None
    if "range" in node:
        r = node["range"]
        ok = (isinstance(r, list) and len(r) == 2
              and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in r))
        if not ok:
            problems.append(f"{where}: {field_name}: range = {r!r} must be two numbers [low, high]")
            return None
        if r[0] >= r[1]:
            problems.append(f"{where}: {field_name}: range = {r!r}: low must be below high")
            return None
        return Gene(name, path, float(r[0]), float(r[1]))
    c = node["choice"]
    if not isinstance(c, list) or not c:
        problems.append(f"{where}: {field_name}: choice = {c!r} must be a non-empty list of values")
        return None
    if path[-1] == "include" and any(not isinstance(v, bool) for v in c):
        problems.append(f"{where}: {field_name}: choice = {c!r}: include takes true or false")
        return None
    return Gene(name, path, choices=list(c))


def _tasks(value: Any, where: str, problems: list[str]) -> list[TaskSpec]:
    if value is None:
        return []
    if not isinstance(value, list):
        problems.append(f"{where}: tasks must be a list of task files (or {{name: FILE, weight: W}})")
        return []
    out = []
    for i, t in enumerate(value):
        if isinstance(t, str):
            out.append(TaskSpec(t))
        elif isinstance(t, dict) and isinstance(t.get("name"), str) and set(t) <= {"name", "weight", "metric"}:
            w = t.get("weight", 1.0)
            if not isinstance(w, (int, float)) or isinstance(w, bool) or w < 0:
                problems.append(f"{where}: tasks[{i}].weight = {w!r} must be a number, at least 0")
                continue
            out.append(TaskSpec(t["name"], float(w)))
        else:
            problems.append(f"{where}: tasks[{i}] = {t!r} must be a task file name or {{name: ..., weight: ...}}")
    return out


def _method_problems(space: SearchSpace, where: str) -> list[str]:
    """Methods exist; every searched parameter is one a candidate method declares, inside its bounds."""
    from mergesmith.methods import get_method

    method_gene = next((g for g in space.genes if g.path == ("merge_method",)), None)
    names = method_gene.choices if method_gene is not None else [space.template.get("merge_method")]
    problems: list[str] = []
    methods = []
    for name in names:
        if isinstance(name, dict) and _is_marker(name):
            continue  # a marker that made no gene: _marker_gene said why
        if not isinstance(name, str):
            problems.append(f"{where}: merge_method = {name!r} must be a method name (mergesmith methods lists them)")
            continue
        try:
            methods.append(get_method(name))
        except (InputError, KeyError, ValueError) as err:
            problems.append(f"{where}: merge_method: {err}")
    for m in methods:
        if m.needs_stats or any(p.stats_file for p in m.params):
            problems.append(f"{where}: merge_method {m.name} needs calibration statistics, which search does not "
                            "support yet; offer another method")
    if not methods:
        return problems
    for gene in space.genes:
        if "parameters" not in gene.path:
            continue
        pname = gene.path[gene.path.index("parameters") + 1]
        declared = [p for m in methods for p in m.params if p.name == pname]
        if not declared:
            problems.append(f"{where}: {_path_text(gene.path)}: no method of {[m.name for m in methods]} has a "
                            f"parameter {pname!r}; see mergesmith methods")
            continue
        if gene.choices is not None:
            continue
        for p in declared:
            below = p.low is not None and (gene.low < p.low or (p.low_open and gene.low == p.low))
            above = p.high is not None and (gene.high > p.high or (p.high_open and gene.high == p.high))
            if below or above:
                bounds = f"{'(' if p.low_open else '['}{p.low}, {p.high}{')' if p.high_open else ']'}"
                problems.append(f"{where}: {_path_text(gene.path)}: range = [{gene.low:g}, {gene.high:g}] leaves "
                                f"{pname}'s bounds {bounds}; narrow the range")
                break
    return problems


def space_problems(space: SearchSpace) -> list[str]:
    """Build the middle candidate for each method on offer, every model kept, and check it as a recipe
    (models opened, shapes matched), before any weight is read."""
    from mergesmith.api import plan_merge
    from mergesmith.checkpoint.config import model_type_problem
    from mergesmith.engine.options import MergeOptions

    method_gene = next((g for g in space.genes if g.path == ("merge_method",)), None)
    variants = method_gene.choices if method_gene is not None else [None]
    problems: list[str] = []
    for method in variants:
        values = space.decode(space.midpoint())
        for g in space.genes:
            if g.path[-1] == "include":
                values[g.name] = True
        if method is not None:
            values[method_gene.name] = method
        try:
            plan = plan_merge(space.recipe(values), MergeOptions(progress=False))
            for m in plan.models:
                m.checkpoint.close()
            runnable = model_type_problem(plan.out_config, plan.models[plan.reference].path / "config.json")
            if runnable:  # every candidate is built from the output config and run
                problems.append(runnable)
        except InputError as err:
            label = f" (with merge_method {method})" if method is not None else ""
            problems += [p.replace("recipe:", f"{space.source}{label}:", 1) for p in err.problems]
    return list(dict.fromkeys(problems))


# ----------------------------------------------------------------------------- mergekit-evolve


def genome_to_space(raw: dict[str, Any], where: str, problems: list[str], notes: list[str]) -> dict[str, Any]:
    """mergekit-evolve's configuration as a space in our syntax.

    The genome has, for each layer group, model and parameter set (one per filter, then
    the rest), one gene per parameter of the method (weight; density for ties and
    dare_ties). As in mergekit-evolve: ``layer_granularity: g`` makes groups of ``g``
    layers, written as slices, or with ``smooth: true`` as gradients over the layers;
    ``normalize`` defaults to on for linear, ties and dare_ties. Unlike mergekit-evolve,
    genes are bounded: weight in [0, 1] ([-1, 1] with ``allow_negative_weights``), density in
    [0.05, 1]; merging is done in float32.
    """
    for key in raw:
        if key not in {"genome", "tasks", "limit"} | EVOLVE_IGNORED:
            problems.append(f"{where}: unknown key {key!r} beside genome:; mergekit-evolve takes genome, tasks, "
                            f"limit, {', '.join(sorted(EVOLVE_IGNORED))}")
    ignored = sorted(k for k in raw if k in EVOLVE_IGNORED)
    if ignored:
        notes.append(f"{where}: {', '.join(ignored)} accepted and ignored (tasks are scored as their files say)")
    genome = raw.get("genome")
    if not isinstance(genome, dict):
        problems.append(f"{where}: genome must be a mapping with models and merge_method")
        return {}
    for key in genome:
        if key not in GENOME_KEYS:
            problems.append(f"{where}: genome.{key}: unknown key; mergekit-evolve's genome takes "
                            f"{', '.join(sorted(GENOME_KEYS))}")
    method = genome.get("merge_method")
    models = genome.get("models")
    base = genome.get("base_model")
    known = isinstance(method, str) and method in GENOME_PARAMS  # (a list or mapping is no key to look up)
    if not known:
        extra = " (slerp genomes are not supported yet)" if method == "slerp" else ""
        problems.append(f"{where}: genome.merge_method = {method!r} must be one of "
                        f"{', '.join(GENOME_PARAMS)}{extra}")
    if not isinstance(models, list) or not models or not all(isinstance(m, str) for m in models):
        problems.append(f"{where}: genome.models must be a non-empty list of model paths")
        models = []
    if base is not None and not isinstance(base, str):
        problems.append(f"{where}: genome.base_model = {base!r} must be a model path")
    elif known and method in GENOME_NEEDS_BASE and not base:
        problems.append(f"{where}: genome.base_model is required for {method}")
    filters = genome.get("filters") or []
    if not isinstance(filters, list) or not all(isinstance(f, str) for f in filters):
        problems.append(f"{where}: genome.filters must be a list of tensor-name substrings")
        filters = []
    granularity = genome.get("layer_granularity", 0) or 0
    if not isinstance(granularity, int) or isinstance(granularity, bool) or granularity < 0:
        problems.append(f"{where}: genome.layer_granularity = {granularity!r} must be a whole number, 0 for none")
        granularity = 0
    smooth = bool(genome.get("smooth", False))
    if problems:
        return {}
    n_layers = _layers_of(models[0], where, problems) if granularity else 0
    if granularity and n_layers and n_layers % granularity:
        problems.append(f"{where}: genome.layer_granularity = {granularity} must divide the {n_layers} layers "
                        f"of {models[0]}")
        return {}
    low_weight = -1.0 if genome.get("allow_negative_weights") else 0.0
    ranges = {"weight": [low_weight, 1.0], "density": [GENOME_DENSITY_LOW, 1.0]}

    def params() -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in GENOME_PARAMS[method]:
            if filters:
                out[name] = [{"filter": f, "value": {"range": list(ranges[name])}} for f in filters] + \
                            [{"value": {"range": list(ranges[name])}}]
            else:
                out[name] = {"range": list(ranges[name])}
        return out

    normalize = genome.get("normalize")
    space: dict[str, Any] = {"merge_method": method, "dtype": "float32",
                             "parameters": {"normalize": method in ("linear", "ties", "dare_ties")
                                            if normalize is None else bool(normalize)}}
    if base:
        space["base_model"] = base
    if genome.get("tokenizer_source"):
        space["tokenizer_source"] = genome["tokenizer_source"]
    groups = n_layers // granularity if granularity else 1
    if groups > 1 and not smooth:
        space["slices"] = [{"sources": [{"model": m, "layer_range": [g * granularity, (g + 1) * granularity],
                                         "parameters": params()} for m in models]
                            + ([{"model": base, "layer_range": [g * granularity, (g + 1) * granularity]}]
                               if base and base not in models else [])}
                           for g in range(groups)]
    else:
        space["models"] = [{"model": m, "parameters": params()} for m in models]
        if groups > 1:
            space["layer_groups"] = groups
    if "tasks" in raw:
        space["tasks"] = raw["tasks"]
    if "limit" in raw:
        space["limit"] = raw["limit"]
    return space


def _layers_of(model: str, where: str, problems: list[str]) -> int:
    from mergesmith.checkpoint.config import read_config
    from mergesmith.checkpoint.layout import num_layers

    try:
        n = num_layers(read_config(Path(model).expanduser() / "config.json"))
    except InputError as err:
        problems.extend(f"{where}: genome.models[0]: {p}" for p in err.problems)
        return 0
    if not n:
        problems.append(f"{where}: genome.models[0]: {model}: its config gives no layer count")
        return 0
    return n


# ----------------------------------------------------------------------------- helpers


def _keep_method_params(raw: dict[str, Any]) -> None:
    """Drop parameters the recipe's method does not declare (a space may offer several methods)."""
    from mergesmith.methods import get_method

    try:
        declared = {p.name for p in get_method(raw["merge_method"]).params}
    except Exception:  # an unknown method is reported by the recipe check
        return

    def prune(params: Any) -> None:
        if isinstance(params, dict):
            for name in [k for k in params if k not in declared]:
                del params[name]

    prune(raw.get("parameters"))
    for entry in _listed(raw.get("models")):
        if isinstance(entry, dict):
            prune(entry.get("parameters"))
    for sl in _listed(raw.get("slices")):
        if isinstance(sl, dict):
            prune(sl.get("parameters"))
            for src in _listed(sl.get("sources")):
                if isinstance(src, dict):
                    prune(src.get("parameters"))


def _listed(value: Any) -> list:
    """``value`` when it is a list, else [] (a space's wrong ``models:`` or ``slices:`` is the recipe
    check's to report, with the rest)."""
    return list(value) if isinstance(value, list) else []


def _plain(value: Any) -> Any:
    """Python floats (not numpy's) and no empty parameter blocks, so that the YAML is clean."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if not (k == "parameters" and v == {})}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        return value.item()
    return value


def _get(raw: Any, path: tuple) -> Any:
    for key in path:
        raw = raw[key]
    return raw


def _set(raw: Any, path: tuple, value: Any) -> None:
    _get(raw, path[:-1])[path[-1]] = value


def _path_text(path: tuple) -> str:
    text = ""
    for key in path:
        text += f"[{key}]" if isinstance(key, int) else (f".{key}" if text else str(key))
    return text


def label_models(space: SearchSpace) -> None:
    """Rename genes after their model's folder name (``facts.weight``) where that is unambiguous."""
    entries = _listed(space.template.get("models"))
    labels = {}
    for i, e in enumerate(entries):
        if isinstance(e, dict) and isinstance(e.get("model"), str):
            labels[i] = Path(e["model"].split("+")[-1]).name or e["model"]
    if len(set(labels.values())) != len(labels):
        return
    for g in space.genes:
        if len(g.path) >= 2 and g.path[0] == "models" and g.path[1] in labels:
            rest = [k for k in g.path[2:] if k != "parameters"]
            g.name = ".".join([labels[g.path[1]], *(_path_text(tuple(rest)),)]) + \
                     (f"@{g.group}" if g.group is not None else "")
