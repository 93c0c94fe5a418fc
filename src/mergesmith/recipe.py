"""The merge recipe: mergekit's YAML schema, validated whole, resolved per tensor.

A recipe names a method, the models (``models:``) or layer slices (``slices:``),
an optional ``base_model`` and parameters. A parameter setting is one of

- a scalar: ``density: 0.5``
- a gradient, a list interpolated across the layers of a slice:
  ``t: [0, 0.5, 1]``. Layer ``i`` of an ``n``-layer slice sits at
  ``t = i / (n - 1)`` (``t = 1`` for a one-layer slice); numeric values are
  interpolated linearly between neighbouring entries (rounded half up for a whole-number
  parameter), others are picked. Tensors
  outside the layers (embeddings, final norm, lm_head) sit at ``t = 0``, so they
  get the *first* value: the same rule as mergekit.
- filtered values, a list of ``{filter: SUBSTRING, value: SETTING}``: the first
  entry whose filter is a substring of the tensor name (or has no filter, or
  ``"*"``) applies. A filter's value is itself a setting.

Nothing else is a setting: an empty list, a list that mixes values and filters or
holds lists, a filter that is not a string are recipe problems, found before planning.

Precedence, highest first: the slice source's (model's) own parameters, then the
slice's, then the recipe's global ``parameters``; then the method's default.

``load_recipe`` checks the whole recipe before any weights are read and raises
one ``InputError`` listing every problem, each naming the file and the field.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from mergesmith.errors import InputError, read_text
from mergesmith.units import parse_size
from mergesmith.methods import BasePolicy, MethodSpec, Param, all_methods, get_method

# ----------------------------------------------------------------------------- schema


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _model_ref(value: Any) -> Any:
    # mergekit also accepts {model: {path: X}, lora: {path: Y}}; we keep the string form X+Y.
    if isinstance(value, dict) and set(value) <= {"model", "lora"} and isinstance(value.get("model"), dict):
        path = value["model"].get("path")
        lora = value.get("lora")
        if lora:
            lora_path = lora.get("path") if isinstance(lora, dict) else lora
            if not isinstance(path, str) or not isinstance(lora_path, str):
                raise ValueError("a LoRA model reference needs model.path and lora.path")
            return f"{path}+{lora_path}"
        return path
    if isinstance(value, str) and "+" in value:
        from mergesmith.checkpoint.lora import split_lora_ref

        model, lora = split_lora_ref(value)
        return f"{model}+{lora}"
    return value


class ModelCalibrationSpec(_Strict):
    files: list[str]


class CalibrationSpec(_Strict):
    """The ``calibration:`` block: data for methods that need statistics (regmean, fisher)."""

    files: list[str] = []
    samples: int = 256
    max_length: int = 512
    seed: int = 0
    batch_size: int = 8
    # Statistics accumulators held at once; "auto": a quarter of the model's float32 size, at most 2 GiB
    # (calibrate.data.CalibrationSettings.accumulator_bytes). Any, as include_answers below.
    memory: Any = "auto"
    cache_dir: Optional[str] = None
    # true: each sequence is the item's context followed by its gold answer (calibrate/data.py).
    # Any, so that a wrong value is reported with the block's other problems, not alone by the schema.
    include_answers: Any = False


class ModelSpec(_Strict):
    model: str
    parameters: Optional[dict[str, Any]] = None
    calibration: Optional[ModelCalibrationSpec] = None

    _ref = field_validator("model", mode="before")(_model_ref)


class SliceSourceSpec(_Strict):
    model: str
    layer_range: tuple[int, int]
    parameters: Optional[dict[str, Any]] = None

    _ref = field_validator("model", mode="before")(_model_ref)


class SliceSpec(_Strict):
    sources: list[SliceSourceSpec]
    base_model: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    residual_weight: Optional[float] = None

    _ref = field_validator("base_model", mode="before")(_model_ref)


class TokenizerSpec(_Strict):
    # mergekit's default: a tokenizer: block without a source builds the union.
    source: str = "union"
    tokens: Optional[dict[str, Any]] = None  # checked by _check_tokenizer, to report every entry's problem
    pad_to_multiple_of: Optional[int] = None

    _ref = field_validator("source", mode="before")(_model_ref)


class RecipeSpec(BaseModel):
    model_config = ConfigDict(extra="allow")

    merge_method: str
    base_model: Optional[str] = None
    models: Optional[list[ModelSpec]] = None
    slices: Optional[list[SliceSpec]] = None
    modules: Optional[dict[str, Any]] = None
    parameters: Optional[dict[str, Any]] = None
    dtype: Optional[str] = None
    out_dtype: Optional[str] = None
    tokenizer_source: Optional[str] = None
    tokenizer: Optional[TokenizerSpec] = None
    chat_template: Optional[str] = None
    random_seed: Optional[int] = None
    name: Optional[str] = None
    calibration: Optional[CalibrationSpec] = None

    _ref = field_validator("base_model", mode="before")(_model_ref)


# ----------------------------------------------------------------------------- normalised recipe


@dataclass
class Source:
    """One input of a slice. ``layer_range`` None means all layers (the ``models:`` form)."""

    model: str
    parameters: dict[str, Any]
    layer_range: Optional[tuple[int, int]] = None
    field: str = ""  # where it came from in the recipe, for messages
    implicit: bool = False  # the base model, added because the method needs it


@dataclass
class Slice:
    sources: list[Source]
    parameters: dict[str, Any]
    base_model: Optional[str]
    field: str = ""


@dataclass
class Calibration:
    """The recipe's calibration data: default files, each model's own files, and the settings."""

    files: tuple[str, ...]
    per_model: dict[str, tuple[str, ...]]  # model reference -> its own files
    samples: int = 256
    max_length: int = 512
    seed: int = 0
    batch_size: int = 8
    memory: Optional[int] = None  # None: "auto"
    cache_dir: Optional[str] = None
    include_answers: bool = False

    def files_for(self, model: str) -> tuple[str, ...]:
        return self.per_model.get(model) or self.files


@dataclass(frozen=True)
class TokenSource:
    """Where one token's embedding and LM-head rows come from, when some model lacks the token or it
    is forced: ``model`` (that model's row for the same token), ``model_token`` (that model's row for
    ``token`` or ``token_id``), ``zero``; None in ``TokenSetting.source``: the automatic rule."""

    kind: str
    model: Optional[str] = None
    token: Optional[str] = None
    token_id: Optional[int] = None


@dataclass(frozen=True)
class TokenSetting:
    source: Optional[TokenSource] = None
    force: bool = False  # the source's row for every model, even those that have the token


@dataclass
class TokenizerSettings:
    """The output tokenizer: ``union`` of every model's, the ``base`` model's or a named model's, plus
    ``tokens`` (added when missing, with how their rows are filled), rows padded to a multiple."""

    source: str
    tokens: dict[str, TokenSetting] = field(default_factory=dict)
    pad_to_multiple_of: Optional[int] = None


@dataclass
class Recipe:
    method: MethodSpec
    slices: list[Slice]
    parameters: dict[str, Any]
    base_model: Optional[str]
    form: str  # "models" or "slices"
    dtype: Optional[str] = None
    out_dtype: Optional[str] = None
    tokenizer_source: Optional[str] = None
    chat_template: Optional[str] = None
    random_seed: int = 0
    source_name: str = "recipe"
    # tokenizer_source or a tokenizer: block, with mergekit's meaning: vocabularies aligned by token.
    tokenizer: Optional[TokenizerSettings] = None
    raw: dict[str, Any] = field(default_factory=dict)
    calibration: Optional[Calibration] = None

    def input_models(self) -> list[str]:
        """The models whose tensors are merged (the tokenizer source alone is not one)."""
        seen: dict[str, None] = {}
        for s in self.slices:
            for src in s.sources:
                seen[src.model] = None
        return list(seen)

    def models(self) -> list[str]:
        """Every model the recipe reads, in first-mention order."""
        seen: dict[str, None] = {}
        if self.base_model:
            seen[self.base_model] = None
        for s in self.slices:
            if s.base_model:
                seen[s.base_model] = None
            for src in s.sources:
                seen[src.model] = None
        if self.tokenizer_source and self.tokenizer_source not in ("base", "union"):
            seen[self.tokenizer_source] = None
        return list(seen)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.raw, sort_keys=False)


# ----------------------------------------------------------------------------- resolution


def _is_scalar(v: Any) -> bool:
    return isinstance(v, (bool, int, float, str))


def _is_conditional(v: Any) -> bool:
    return isinstance(v, dict) and "value" in v and set(v) <= {"value", "filter"}


def resolve_setting(setting: Any, tensor_name: str, t: float, param: Param) -> Any:
    """Resolve one setting for one tensor at layer position ``t``; None if no filter matches."""
    if _is_conditional(setting):
        setting = [setting]
    if _is_scalar(setting):
        return param.coerce(setting)
    if isinstance(setting, list):
        if not setting:
            return None
        if all(_is_scalar(e) for e in setting):
            values = [param.coerce(e) for e in setting]
            numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
            if not numeric:
                return values[int(t * (len(values) - 1))]
            pos = t * (len(values) - 1)
            i0 = int(pos)
            i1 = min(len(values) - 1, i0 + 1)
            frac = pos - i0
            value = (1 - frac) * values[i0] + frac * values[i1]
            return param.coerce(math.floor(value + 0.5) if param.kind is int else value)
        for cond in setting:
            flt = cond.get("filter")
            if flt is None or flt == "*" or (tensor_name and flt in tensor_name):
                return resolve_setting(cond["value"], tensor_name, t, param)
        return None
    raise ValueError(f"unexpected setting {setting!r}")


def resolve_param(param: Param, scopes: list[dict[str, Any]], tensor_name: str, t: float) -> Any:
    """First value found in ``scopes`` (highest precedence first), else the default.

    Raises KeyError when a required parameter resolves nowhere.
    """
    for scope in scopes:
        if param.name in scope:
            value = resolve_setting(scope[param.name], tensor_name, t, param)
            if value is not None:
                return value
    if param.required:
        raise KeyError(param.name)
    return param.default


class ParamResolver:
    """Resolves each output tensor's parameters while a merge is planned and runs the method's
    ``check_params`` on them, gathering what is wrong for the tensors it is wrong for.

    A required parameter has no value for a tensor when every scope setting it is a filter list
    and no filter matches the tensor's name: the recipe check cannot see that, as it needs the
    models' tensor names. The problems come out grouped, one per model (or slice) and parameter,
    and one per failed check, each naming a few of its tensors and how many there are.
    """

    def __init__(self, recipe: "Recipe", shown: int = 3):
        self.recipe = recipe
        self.shown = shown
        self.tensors = 0  # output tensors resolved
        self.tried: dict[tuple[str, str], int] = {}  # (owner, parameter) -> tensors resolved
        self.missing: dict[tuple[str, str], list[str]] = {}  # (owner, parameter) -> tensors left without
        self.settings: dict[tuple[str, str], list[str]] = {}  # (owner, parameter) -> the fields that set it
        self.failed: dict[str, list[str]] = {}  # check_params message -> tensors

    def resolve(self, sl: Slice, out_name: str, input_names: list[str], t: float,
                base_index: Optional[int]) -> Optional[tuple[dict[str, Any], list[dict[str, Any]]]]:
        """One output tensor's global parameters and each input's per-model ones, at layer position
        ``t``; None when a required one has no value for it (``problems`` then says which)."""
        method = self.recipe.method
        self.tensors += 1
        shared = [(sl.parameters, f"{sl.field}.parameters"), (self.recipe.parameters, "parameters")]
        owner = sl.field if self.recipe.form == "slices" else ""
        complete = True
        params: dict[str, Any] = {}
        for p in method.params:
            if not p.per_model:
                complete &= self._one(p, shared, owner, out_name, t, params)
        model_params = []
        for k, (src, name) in enumerate(zip(sl.sources, input_names)):
            values: dict[str, Any] = {}
            for p in method.params:
                if p.per_model and (k != base_index or p.on_base):
                    complete &= self._one(p, [(src.parameters, f"{src.field}.parameters"), *shared],
                                          f"{src.field} ({src.model})", name, t, values)
            model_params.append(values)
        if not complete:
            return None
        for message in method.check_params(params, model_params) if method.check_params else []:
            self.failed.setdefault(message, []).append(out_name)
        return params, model_params

    def _one(self, param: Param, scopes: list[tuple[dict[str, Any], str]], owner: str, tensor: str, t: float,
             into: dict[str, Any]) -> bool:
        key = (owner, param.name)
        self.tried[key] = self.tried.get(key, 0) + 1
        try:
            into[param.name] = resolve_param(param, [scope for scope, _ in scopes], tensor, t)
            return True
        except KeyError:
            self.missing.setdefault(key, []).append(tensor)
            self.settings[key] = [f"{name}.{param.name} = {_flow(scope[param.name])}"
                                  for scope, name in scopes if param.name in scope]
            return False

    def problems(self) -> list[str]:
        where = self.recipe.source_name
        out = []
        for (owner, name), tensors in self.missing.items():
            settings = self.settings[(owner, name)]
            match = "matches" if len(settings) == 1 else "match"
            who = f"{owner}: " if owner else ""
            out.append(f"{where}: {who}{name} has no value for {self._few(tensors, self.tried[(owner, name)])}: "
                       f"{' and '.join(settings)} {match} none of them; end the list with an entry without a "
                       "filter, {value: ...}, for the tensors no filter names")
        for message, tensors in self.failed.items():
            out.append(f"{where}: {self._few(tensors, self.tensors)}: {message}")
        return out

    def _few(self, tensors: list[str], total: int) -> str:
        """``tensors`` as their count and a few of their names: ``2 of 30 tensors (a, b)``."""
        more = f" and {len(tensors) - self.shown} more" if len(tensors) > self.shown else ""
        return f"{len(tensors)} of {total} tensors ({', '.join(tensors[:self.shown])}{more})"


def _flow(setting: Any, limit: int = 80) -> str:
    """A setting as a short line of YAML, the way a recipe writes it."""
    text = yaml.safe_dump(setting, default_flow_style=True, width=10_000).strip()
    text = text[:-4].rstrip() if text.endswith("\n...") else text
    return text if len(text) <= limit else text[:limit - 3] + "..."


# ----------------------------------------------------------------------------- loading and checks


def read_recipe_raw(recipe: Union[str, Path, dict[str, Any]]) -> tuple[dict[str, Any], str]:
    """The recipe as a plain dict and the name to cite it by. Raises InputError."""
    if isinstance(recipe, dict):
        return copy.deepcopy(recipe), "recipe"
    path = Path(recipe)
    where = str(path)
    if not path.is_file():
        raise InputError(f"{where}: no such recipe file" if not path.exists() else f"{where}: not a file")
    try:
        raw = yaml.safe_load(read_text(path))
    except yaml.YAMLError as err:
        raise InputError(f"{where}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise InputError(f"{where}: a recipe is a YAML mapping with at least merge_method and models or slices")
    return raw, where


def model_refs_of(raw: dict[str, Any]) -> list[str]:
    """Every model reference a raw recipe names, found even when the recipe is invalid.

    Used to check the model folders in the same round as the recipe itself, so that
    every problem is reported at once. Entries of the wrong shape are skipped (the
    recipe check reports them).
    """
    def dicts(value: Any) -> list[dict]:
        return [e for e in value if isinstance(e, dict)] if isinstance(value, list) else []

    found: list[Any] = [raw.get("base_model")]
    found += [entry.get("model") for entry in dicts(raw.get("models"))]
    for sl in dicts(raw.get("slices")):
        found.append(sl.get("base_model"))
        found += [src.get("model") for src in dicts(sl.get("sources"))]
    tok = raw.get("tokenizer")
    found.append(raw.get("tokenizer_source") or (tok.get("source") if isinstance(tok, dict) else None))
    refs: dict[str, None] = {}
    for ref in found:
        try:
            ref = _model_ref(ref)
        except (ValueError, AttributeError, TypeError, InputError):
            continue
        if isinstance(ref, str) and ref and ref not in ("base", "union"):
            refs.setdefault(ref, None)
    return list(refs)


def load_recipe(recipe: Union[str, Path, dict[str, Any]]) -> Recipe:
    """Parse and check a recipe (a YAML path or a dict). Raises InputError with every problem."""
    raw, where = read_recipe_raw(recipe)
    for key in raw:
        if key not in RecipeSpec.model_fields:
            warnings.warn(f"{where}: unknown top-level key {key!r} is ignored; check its spelling", stacklevel=2)
    try:
        spec = RecipeSpec.model_validate(raw)
    except ValidationError as err:
        raise InputError([_pydantic_problem(where, e) for e in err.errors()]) from None

    problems: list[str] = []
    method: Optional[MethodSpec] = None
    try:
        method = get_method(spec.merge_method)
    except KeyError:
        problems.append(f"{where}: merge_method = {spec.merge_method!r} is not a known method; "
                        f"choose one of: {', '.join(all_methods())}")

    forms = [k for k in ("models", "slices", "modules") if getattr(spec, k)]
    if spec.modules:
        problems.append(f"{where}: modules: is not supported yet; use models: or slices:")
    if len(forms) != 1:
        problems.append(f"{where}: give exactly one of models: or slices: (found {', '.join(forms) or 'neither'})")
        raise InputError(problems)
    if spec.tokenizer_source and spec.tokenizer:
        problems.append(f"{where}: give tokenizer_source or tokenizer, not both (tokenizer.source says the same)")
    tokenizer_source = spec.tokenizer_source or (spec.tokenizer.source if spec.tokenizer else None)
    for key in ("dtype", "out_dtype"):
        value = getattr(spec, key)
        if value is not None and value not in ("float32", "float16", "bfloat16", "fp32", "fp16", "bf16"):
            problems.append(f"{where}: {key} = {value!r} must be float32, float16 or bfloat16")

    global_params = dict(spec.parameters or {})
    slices: list[Slice] = []
    if spec.models:
        sources = [Source(m.model, dict(m.parameters or {}), None, f"models[{i}]")
                   for i, m in enumerate(spec.models)]
        # As mergekit does: a base model not listed under models: is still an input.
        if spec.base_model and spec.base_model not in [s.model for s in sources]:
            sources.append(Source(spec.base_model, {}, None, "base_model", implicit=True))
        slices.append(Slice(sources, {}, spec.base_model, "models"))
    else:
        for i, sl in enumerate(spec.slices or []):
            sources = [Source(s.model, dict(s.parameters or {}), tuple(s.layer_range), f"slices[{i}].sources[{j}]")
                       for j, s in enumerate(sl.sources)]
            slices.append(Slice(sources, dict(sl.parameters or {}), sl.base_model or spec.base_model,
                                f"slices[{i}]"))

    if method is None:
        raise InputError(problems)
    _check_structure(where, method, slices, problems)
    _check_settings(where, method, global_params, "parameters", problems)
    for sl in slices:
        if sl.parameters:
            _check_settings(where, method, sl.parameters, f"{sl.field}.parameters", problems)
        for src in sl.sources:
            _check_settings(where, method, src.parameters, f"{src.field}.parameters", problems, model_scope=True)
    _check_required(where, method, slices, global_params, problems)
    calibration = _check_calibration(where, method, spec, slices, problems)
    tokenizer = _check_tokenizer(where, spec, tokenizer_source, slices, problems)
    if problems:
        raise InputError(problems)
    return Recipe(method=method, slices=slices, parameters=global_params, base_model=spec.base_model,
                  form="models" if spec.models else "slices", dtype=spec.dtype, out_dtype=spec.out_dtype,
                  tokenizer_source=tokenizer_source, chat_template=spec.chat_template,
                  random_seed=spec.random_seed or 0, source_name=where, raw=raw, calibration=calibration,
                  tokenizer=tokenizer)


def _check_tokenizer(where: str, spec: RecipeSpec, source: Optional[str], slices: list[Slice],
                     problems: list[str]) -> Optional[TokenizerSettings]:
    """``tokenizer_source`` or the ``tokenizer:`` block as settings, every entry of ``tokens:`` checked:
    a token source names a model the recipe merges (its rows are read beside the others'), a
    ``model_token`` gives ``token`` or ``token_id``, ``force`` has a source to force."""
    if source is None:
        return None
    inputs = {src.model for sl in slices for src in sl.sources}
    block = spec.tokenizer or TokenizerSpec(source=source)
    settings = TokenizerSettings(source, {}, block.pad_to_multiple_of)
    if not isinstance(source, str) or not source:
        problems.append(f"{where}: tokenizer source {source!r} must be union, base or a model path")
    if block.pad_to_multiple_of is not None and block.pad_to_multiple_of < 1:
        problems.append(f"{where}: tokenizer.pad_to_multiple_of = {block.pad_to_multiple_of} must be at least 1")
    for token, entry in (block.tokens or {}).items():
        field_name = f"tokenizer.tokens[{token!r}]"
        setting = _token_setting(where, field_name, entry, inputs, problems)
        if setting is not None:
            settings.tokens[str(token)] = setting
    return settings


def _token_setting(where: str, field_name: str, entry: Any, inputs: set[str],
                   problems: list[str]) -> Optional[TokenSetting]:
    """One ``tokens:`` entry: ``{source: MODEL | {kind: model_token, model, token | token_id} |
    {kind: zero}, force: bool}``; None (with the problem noted) when it is malformed."""
    if entry is None:
        entry = {}
    if not isinstance(entry, dict) or set(entry) - {"source", "force"}:
        problems.append(f"{where}: {field_name} must be a mapping with source: and force: (found {_flow(entry)})")
        return None
    force = entry.get("force", False)
    if not isinstance(force, bool):
        problems.append(f"{where}: {field_name}.force = {force!r} must be true or false")
        return None
    raw = entry.get("source")
    source: Optional[TokenSource] = None
    if isinstance(raw, dict) and raw.get("kind") == "zero" and set(raw) == {"kind"}:
        source = TokenSource("zero")
    elif isinstance(raw, dict) and raw.get("kind") == "model_token":
        model = _model_ref(raw.get("model"))
        token, token_id = raw.get("token"), raw.get("token_id")
        if set(raw) - {"kind", "model", "token", "token_id"} or (token is None) == (token_id is None) \
                or (token is not None and not isinstance(token, str)) \
                or (token_id is not None and (not isinstance(token_id, int) or token_id < 0)):
            problems.append(f"{where}: {field_name}.source = {_flow(raw)}: a model_token names model: and exactly "
                            "one of token: (a string) or token_id: (a row number)")
            return None
        source = TokenSource("model_token", model, token, token_id)
    elif isinstance(raw, (str, dict)):
        source = TokenSource("model", _model_ref(raw))
    elif raw is not None:
        problems.append(f"{where}: {field_name}.source = {_flow(raw)} must be a model, "
                        "{kind: model_token, model: M, token: T} or {kind: zero}")
        return None
    if source is not None and source.kind != "zero" and source.model not in inputs:
        problems.append(f"{where}: {field_name}.source names {source.model!r}, which the recipe does not merge; "
                        f"name one of: {', '.join(sorted(inputs))}")
        return None
    if force and source is None:
        problems.append(f"{where}: {field_name}.force is true but there is no source: to force; add one")
        return None
    return TokenSetting(source, force)


def _check_calibration(where: str, method: MethodSpec, spec: RecipeSpec, slices: list[Slice],
                       problems: list[str]) -> Optional[Calibration]:
    """The calibration block and every model's files, checked: numbers in range, files present, and
    data for every model when the method needs statistics."""

    block = spec.calibration
    per_model: dict[str, tuple[str, ...]] = {}
    for i, m in enumerate(spec.models or []):
        if m.calibration is not None:
            per_model[m.model] = tuple(m.calibration.files)
            _check_files(where, f"models[{i}].calibration.files", m.calibration.files, problems)
    if block is None and not per_model:
        if method.needs_stats:
            problems.append(f"{where}: merge_method {method.name} needs calibration data "
                            f"({', '.join(method.needs_stats)} statistics); add a calibration: block with files: "
                            "(task files, e.g. JSONL)")
        return None
    if not method.needs_stats:
        warnings.warn(f"{where}: calibration: is not used by merge_method {method.name}, which needs no "
                      "statistics; it is ignored", stacklevel=3)
    block = block or CalibrationSpec()
    _check_files(where, "calibration.files", block.files, problems)
    for name in ("samples", "max_length", "batch_size"):
        value = getattr(block, name)
        if value < 1:
            problems.append(f"{where}: calibration.{name} = {value} must be at least 1")
    memory: Optional[int] = None
    if block.memory != "auto":
        memory = 0
        if isinstance(block.memory, int) and not isinstance(block.memory, bool):
            memory = block.memory
        elif isinstance(block.memory, str):
            with contextlib.suppress(argparse.ArgumentTypeError):
                memory = parse_size(block.memory)
        if memory < 1:
            problems.append(f"{where}: calibration.memory = {block.memory!r} must be a positive size like 2GiB "
                            "or 500MB, or auto (the default: a quarter of the model's float32 size, at most 2 GiB)")
    if block.cache_dir is not None:
        from mergesmith.paths import output_problems

        problems += [f"{where}: calibration.cache_dir = {p}" for p in output_problems(block.cache_dir, {})]
    if not isinstance(block.include_answers, bool):
        problems.append(f"{where}: calibration.include_answers = {block.include_answers!r} must be true or false "
                        "(true: calibrate on each item's prompt followed by its gold answer; false: prompts only)")
    if method.needs_stats:
        for sl in slices:
            for src in sl.sources:
                if not block.files and src.model not in per_model:
                    fix = (f"add {src.field}.calibration.files" if src.field.startswith("models[")
                           and not src.implicit else "add calibration.files (the default for every model)")
                    problems.append(f"{where}: {src.field} ({src.model}): {method.name} needs calibration data for "
                                    f"every model and this one has none; {fix}")
    return Calibration(tuple(block.files), per_model, block.samples, block.max_length, block.seed,
                       block.batch_size, memory, block.cache_dir, block.include_answers is True)


def _check_files(where: str, field_name: str, files: list[str], problems: list[str]) -> None:
    for i, name in enumerate(files):
        path = Path(name).expanduser()
        if not path.is_file():
            problems.append(f"{where}: {field_name}[{i}] = {name!r}: no such file; give a task file "
                            "(JSONL, competition CSV or YAML task config), relative to the working directory")


def _pydantic_problem(where: str, error: dict[str, Any]) -> str:
    loc = ""
    for part in error["loc"]:
        loc += f"[{part}]" if isinstance(part, int) else (f".{part}" if loc else str(part))
    msg = error["msg"]
    if error["type"] == "missing":
        msg = "is required"
    elif error["type"] == "extra_forbidden":
        msg = "is not a recipe field; check its spelling"
    return f"{where}: {loc or 'recipe'} {msg}"


def _check_structure(where: str, method: MethodSpec, slices: list[Slice], problems: list[str]) -> None:
    for sl in slices:
        non_base = [s for s in sl.sources if s.model != sl.base_model]
        has_base = sl.base_model is not None and any(s.model == sl.base_model for s in sl.sources)
        label = "models" if sl.field == "models" else sl.field
        if method.base is BasePolicy.REQUIRED and not sl.base_model:
            problems.append(f"{where}: merge_method {method.name} needs a base model; add base_model: "
                            "(the model the others were fine-tuned from)")
        elif method.base is BasePolicy.REQUIRED and not has_base:
            problems.append(f"{where}: {label}: the base model {sl.base_model} must be one of the slice's sources "
                            f"for {method.name}")
        if method.passthrough:
            if len(sl.sources) != 1:
                problems.append(f"{where}: {label}: passthrough takes exactly one model per slice "
                                f"(found {len(sl.sources)})")
            continue
        counted = non_base if method.base is not BasePolicy.IGNORED else sl.sources
        what = "models besides the base" if method.base is not BasePolicy.IGNORED else "models"
        if len(counted) < method.min_models:
            problems.append(f"{where}: {label}: {method.name} needs at least {method.min_models} {what} "
                            f"(found {len(counted)})")
        if method.max_models is not None and len(counted) > method.max_models:
            problems.append(f"{where}: {label}: {method.name} takes at most {method.max_models} {what} "
                            f"(found {len(counted)})")
        if sl.field != "models":
            for s in sl.sources:
                lo, hi = s.layer_range or (0, 0)
                if lo < 0 or hi <= lo:
                    problems.append(f"{where}: {s.field}.layer_range = [{lo}, {hi}] must satisfy 0 <= start < end")
            lengths = {(s.layer_range[1] - s.layer_range[0]) for s in sl.sources if s.layer_range}
            if len(lengths) > 1:
                problems.append(f"{where}: {sl.field}: all sources of a slice need the same number of layers "
                                f"(found {sorted(lengths)})")
        models = [s.model for s in sl.sources]
        dupes = {m for m in models if models.count(m) > 1}
        if dupes and sl.field == "models":
            problems.append(f"{where}: models: {', '.join(sorted(dupes))} listed more than once")


def _leaves(setting: Any, path: str):
    """Yield (path, scalar, None) for every value inside a setting, and (path, part, why) for a part
    whose shape ``resolve_setting`` does not take, so that a recipe it would fail on never reaches
    planning."""
    if _is_scalar(setting):
        yield path, setting, None
    elif _is_conditional(setting):
        yield from _leaves(setting["value"], f"{path}.value")
    elif isinstance(setting, list) and setting and all(_is_scalar(e) for e in setting):
        for i, e in enumerate(setting):
            yield f"{path}[{i}]", e, None
    elif isinstance(setting, list) and setting and all(_is_conditional(e) for e in setting):
        for i, e in enumerate(setting):
            yield from _leaves(e["value"], f"{path}[{i}].value")
    else:
        yield path, setting, _shape_problem(setting)


def _shape_problem(setting: Any) -> str:
    """Why a part of a setting that ``_leaves`` marked has no shape a parameter can take."""
    takes = "give a value, a gradient (a list of values) or a list of {filter, value}"
    if isinstance(setting, list) and not setting:
        return f"is an empty list, which gives no value; {takes}"
    if isinstance(setting, list):
        return ("mixes values with lists or {filter, value} entries; a gradient holds values only, "
                f"a filter list {{filter, value}} entries only; {takes}")
    if isinstance(setting, dict) and "value" not in setting:
        return f"is a mapping without value:; {takes}"
    if isinstance(setting, dict):
        extra = ", ".join(sorted(str(k) for k in setting if k not in ("value", "filter")))
        return f"has keys other than filter and value ({extra}); {takes}"
    if setting is None:
        return f"is empty (null); {takes}"
    return f"= {setting!r} is not a value; {takes}"


def _filter_problems(setting: Any, path: str) -> list[str]:
    """Every filter inside a setting that is not a string (a filter is a substring of tensor names)."""
    if _is_conditional(setting):
        entries = [(path, setting)]
    elif isinstance(setting, list):
        entries = [(f"{path}[{i}]", e) for i, e in enumerate(setting) if _is_conditional(e)]
    else:
        return []
    problems = []
    for step, entry in entries:
        flt = entry.get("filter")
        if flt is not None and not isinstance(flt, str):
            problems.append(f"{step}.filter = {flt!r} must be a string (part of the tensor names to match)")
        problems += _filter_problems(entry["value"], f"{step}.value")
    return problems


def _check_settings(where: str, method: MethodSpec, params: dict[str, Any], field_name: str,
                    problems: list[str], model_scope: bool = False) -> None:
    for name, setting in params.items():
        param = method.param(name)
        if param is None:
            known = ", ".join(p.name for p in method.params) or "none"
            warnings.warn(f"{where}: {field_name}.{name} is not a parameter of {method.name} "
                          f"(its parameters: {known}); it is ignored", stacklevel=3)
            continue
        if model_scope and not param.per_model:
            # As in mergekit, a model's own parameters only hold per-model ones.
            warnings.warn(f"{where}: {field_name}.{name} is a global parameter of {method.name}, so a model's "
                          f"value is ignored; set it under parameters: (or a slice's parameters:)", stacklevel=3)
        problems += [f"{where}: {p}" for p in _filter_problems(setting, f"{field_name}.{name}")]
        for path, value, malformed in _leaves(setting, f"{field_name}.{name}"):
            if malformed:
                problems.append(f"{where}: {path} {malformed}")
                continue
            try:
                coerced = param.coerce(value)
            except ValueError as err:
                problems.append(f"{where}: {path} = {value!r} {err}")
                continue
            why = param.check(coerced)
            if why:
                problems.append(f"{where}: {path} = {value!r} {why}")
            elif param.unusual(coerced):
                warnings.warn(f"{where}: {path} = {value!r} {param.unusual(coerced)}", stacklevel=3)


def _check_required(where: str, method: MethodSpec, slices: list[Slice], global_params: dict[str, Any],
                    problems: list[str]) -> None:
    for param in method.params:
        if not param.required:
            continue
        if not param.per_model:
            if param.name not in global_params and not all(param.name in sl.parameters for sl in slices):
                problems.append(f"{where}: parameters.{param.name} is required by {method.name}; "
                                f"add it under parameters:")
            continue
        for sl in slices:
            for src in sl.sources:
                is_base = src.model == sl.base_model and method.base is not BasePolicy.IGNORED
                if is_base and not param.on_base:
                    continue
                if not any(param.name in scope for scope in (src.parameters, sl.parameters, global_params)):
                    fix = (f"add {src.field}.parameters.{param.name}" if not src.implicit else
                           f"list the base model under models: with parameters.{param.name}, "
                           f"or set a global parameters.{param.name}")
                    problems.append(f"{where}: {src.field} ({src.model}): {param.name} is required by "
                                    f"{method.name}; {fix}")
