"""Tasks are data: items (prompt, choices and answer, or references) plus settings.

Three sources, one result (a list of ``Task``):

- JSONL, one item per line, the format the zoo writes::

    {"id": "q1", "type": "multiple_choice", "prompt": "...", "choices": ["...", "..."], "answer": 0}
    {"id": "g1", "type": "generation", "prompt": "...", "references": ["..."]}

  ``answer: null`` (or ``references: []``) marks an unlabelled item: it is predicted
  but not scored. Unknown extra fields are ignored.
- CSV in the LLM Merging Competition's format: columns ``id, input, eval_type`` and,
  optionally, ``answer_choices`` (a list or a stringified Python list) and
  ``target`` (the index of the right choice, or a generation's reference); columns
  may come in any order. Its generation rows are headlined by ROUGE-L, the
  competition's metric (``CSV_DEFAULT_METRIC``), not exact match.
- A YAML task config (lm-evaluation-harness style) that points at one of the above
  (``data:``) or at a Hugging Face ``datasets`` dataset (``dataset:`` with a
  ``fields:`` mapping), and carries task-level settings: ``target_delimiter``,
  ``description``, ``fewshot``, ``chat_template``, ``system_prompt``, ``metric``,
  ``generation``, ``limit``.

A file whose rows mix multiple choice and generation becomes one task per type
(``<stem>.multiple_choice`` and ``<stem>.generation``): their metrics differ, and
the competition scores them as separate datasets too.

Bad rows raise one ``InputError`` naming the file, the row and the fix, unless
``skip_bad_rows`` is set; then they are skipped and counted on the task.
"""

from __future__ import annotations

import ast
import csv
import io
import json
import math
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mergesmith.errors import InputError, read_text

MULTIPLE_CHOICE = "multiple_choice"
GENERATION = "generation"
TASK_TYPES = (MULTIPLE_CHOICE, GENERATION)

MC_METRICS = ("acc", "acc_norm_chars", "acc_norm_tokens")
GEN_METRICS = ("exact_match", "f1", "rougeL")
DEFAULT_METRIC = {MULTIPLE_CHOICE: "acc", GENERATION: "exact_match"}
# The competition scores generation by ROUGE-L (the starter kit's reports, its validation
# runs): a competition CSV's generation rows are headlined by it unless a config or a flag
# says otherwise. Exact match is still computed and reported beside it.
CSV_DEFAULT_METRIC = {GENERATION: "rougeL"}
MAX_PROBLEMS_SHOWN = 20


# ----------------------------------------------------------------------------- data model


@dataclass(frozen=True)
class Item:
    """One question. ``answer``/``references`` empty means unlabelled (predicted, not scored).

    ``position`` is the row's index among all rows of its source file and ``row``
    the human-facing location ("line 3", "row 2"), for submissions and errors.
    """

    id: str
    type: str
    prompt: str
    choices: tuple[str, ...] = ()
    answer: Optional[int] = None
    references: tuple[str, ...] = ()
    position: int = 0
    row: str = ""

    @property
    def labelled(self) -> bool:
        return self.answer is not None if self.type == MULTIPLE_CHOICE else bool(self.references)

    @property
    def gold_text(self) -> Optional[str]:
        """The text a few-shot example shows as its answer."""
        if self.type == MULTIPLE_CHOICE:
            return None if self.answer is None else self.choices[self.answer]
        return self.references[0] if self.references else None


@dataclass(frozen=True)
class FewShot:
    num: int = 0
    pool: tuple[Item, ...] = ()  # empty: draw from the task's own items
    seed: int = 1234
    delimiter: str = "\n\n"
    multiturn: bool = False


@dataclass(frozen=True)
class TaskSettings:
    """Task-level settings; the defaults are what a bare JSONL or CSV file gets."""

    target_delimiter: str = ""
    description: str = ""
    fewshot: FewShot = FewShot()
    chat_template: bool = False
    system_prompt: Optional[str] = None
    metric: Optional[str] = None
    max_new_tokens: int = 64
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class SkippedRow:
    position: int
    id: str
    reason: str


@dataclass
class Task:
    name: str
    type: str
    items: list[Item]
    settings: TaskSettings = TaskSettings()
    source: str = ""
    skipped: list[SkippedRow] = field(default_factory=list)

    @property
    def headline(self) -> str:
        """The metric the task's score (and the macro average) uses."""
        return self.settings.metric or DEFAULT_METRIC[self.type]

    @property
    def labelled(self) -> int:
        return sum(item.labelled for item in self.items)


# ----------------------------------------------------------------------------- row schemas


class _Row(BaseModel):
    model_config = ConfigDict(extra="ignore", str_strip_whitespace=False)
    id: Union[str, int]
    prompt: str


class _MCRow(_Row):
    choices: list[str] = Field(min_length=2)
    answer: Optional[int]


class _GenRow(_Row):
    references: Optional[list[str]]


def _pydantic_problems(err: ValidationError) -> list[str]:
    out = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "row"
        msg = e["msg"]
        if e["type"] == "missing":
            msg = "is missing"
        out.append(f"field '{loc}' {msg}")
    return out


def _make_item(raw: dict, kind: str, position: int, row: str) -> Item:
    """Validate one row (already in the JSONL field names) into an Item, or raise ValueError."""
    row_id = raw.get("id")
    if row_id is not None and (isinstance(row_id, bool) or not isinstance(row_id, (str, int))):
        raise ValueError(f"field 'id' must be a string or a whole number, not {type(row_id).__name__}")
    try:
        if kind == MULTIPLE_CHOICE:
            parsed = _MCRow.model_validate(raw)
        else:
            parsed = _GenRow.model_validate(raw)
    except ValidationError as err:
        raise ValueError("; ".join(_pydantic_problems(err))) from None
    if kind == MULTIPLE_CHOICE:
        empty = [i for i, c in enumerate(parsed.choices) if c == ""]
        if empty:
            raise ValueError(f"choice {empty[0]} is empty; every choice needs text")
        if parsed.answer is not None and not 0 <= parsed.answer < len(parsed.choices):
            raise ValueError(f"answer {parsed.answer} is out of range for {len(parsed.choices)} "
                             f"choices (use an index from 0 to {len(parsed.choices) - 1})")
        return Item(id=str(parsed.id), type=kind, prompt=parsed.prompt, choices=tuple(parsed.choices),
                    answer=parsed.answer, position=position, row=row)
    return Item(id=str(parsed.id), type=kind, prompt=parsed.prompt,
                references=tuple(parsed.references or ()), position=position, row=row)


class _Collector:
    """Gathers row problems; skips them (and counts) or raises them all at the end."""

    def __init__(self, path: str, skip_bad_rows: bool):
        self.path, self.skip = path, skip_bad_rows
        self.problems: list[str] = []
        self.skipped: list[SkippedRow] = []

    def bad(self, position: int, row: str, row_id: str, reason: str) -> None:
        where = f"{row}" + (f" (id {row_id})" if row_id else "")
        self.problems.append(f"{self.path}: {where}: {reason}")
        self.skipped.append(SkippedRow(position, row_id, reason))

    def finish(self) -> None:
        if self.problems and not self.skip:
            shown = self.problems[:MAX_PROBLEMS_SHOWN]
            if len(self.problems) > MAX_PROBLEMS_SHOWN:
                shown.append(f"{self.path}: ... and {len(self.problems) - MAX_PROBLEMS_SHOWN} more bad rows")
            shown.append(f"{self.path}: fix the rows above, or pass --skip-bad-rows "
                         "(skip_bad_rows=True) to skip them and count them")
            raise InputError(shown)


# ----------------------------------------------------------------------------- JSONL


def read_jsonl(path: Path, skip_bad_rows: bool = False) -> tuple[list[Item], list[SkippedRow]]:
    collector = _Collector(str(path), skip_bad_rows)
    items: list[Item] = []
    position = 0
    with io.StringIO(read_text(path), newline=None) as fh:  # universal newlines, as open() reads text
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            row = f"line {lineno}"
            pos, position = position, position + 1
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as err:
                collector.bad(pos, row, "", f"not valid JSON ({err.msg} at column {err.colno})")
                continue
            if not isinstance(raw, dict):
                collector.bad(pos, row, "", "a line must be a JSON object")
                continue
            row_id = str(raw.get("id", ""))
            kind = raw.get("type")
            if kind not in TASK_TYPES:
                collector.bad(pos, row, row_id, f"field 'type' is {kind!r}; use 'multiple_choice' or 'generation'")
                continue
            try:
                items.append(_make_item(raw, kind, pos, row))
            except ValueError as err:
                collector.bad(pos, row, row_id, str(err))
    collector.finish()
    return items, collector.skipped


# ----------------------------------------------------------------------------- competition CSV

CSV_REQUIRED = ("id", "input", "eval_type")
_EMPTY = ("", "none", "nan", "null")


def _is_empty(value: Optional[str]) -> bool:
    return value is None or value.strip().lower() in _EMPTY


def parse_answer_choices(text: str) -> list[str]:
    """A JSON list or a stringified Python list (the competition writes ``"['a', 'b']"``)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise ValueError(f"answer_choices {_clip(text)!r} is not a list; write it as "
                             "['choice a', 'choice b']") from None
    if not isinstance(value, (list, tuple)) or not all(isinstance(c, str) for c in value):
        raise ValueError(f"answer_choices {_clip(text)!r} must be a list of strings")
    return list(value)


def _clip(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def _csv_target_to_answer(target: str, choices: list[str]) -> int:
    text = target.strip()
    try:
        number = float(text)
    except ValueError:
        if target in choices:
            return choices.index(target)
        raise ValueError(f"target {_clip(target)!r} is neither a choice index nor one of the choices") from None
    if not number.is_integer():
        raise ValueError(f"target {text!r} is not a whole number; give the index of the right choice")
    return int(number)


def read_competition_csv(path: Path, skip_bad_rows: bool = False) -> tuple[list[Item], list[SkippedRow]]:
    collector = _Collector(str(path), skip_bad_rows)
    items: list[Item] = []
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with io.StringIO(read_text(path), newline="") as fh:  # newline="": the csv module's own line handling
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        missing = [c for c in CSV_REQUIRED if c not in header]
        if header and missing:
            raise InputError(f"{path}: missing column(s) {', '.join(missing)}; a competition CSV has "
                             f"columns id, input, eval_type and optionally answer_choices, target "
                             f"(found: {', '.join(header)})")
        for position, record in enumerate(reader):
            row = f"row {position + 1}"
            row_id = (record.get("id") or "").strip()
            try:
                items.append(_csv_item(record, position, row))
            except ValueError as err:
                collector.bad(position, row, row_id, str(err))
    collector.finish()
    return items, collector.skipped


def _csv_item(record: dict, position: int, row: str) -> Item:
    if None in record:  # more cells than header columns
        raise ValueError("has more cells than the header has columns (an unquoted comma?)")
    kind = (record.get("eval_type") or "").strip()
    if kind not in TASK_TYPES:
        raise ValueError(f"eval_type is {kind!r}; use multiple_choice or generation")
    raw: dict[str, Any] = {"id": (record.get("id") or "").strip(), "prompt": record.get("input")}
    if raw["id"] == "":
        raise ValueError("id is empty")
    target = record.get("target")
    if kind == MULTIPLE_CHOICE:
        choices_text = record.get("answer_choices")
        if _is_empty(choices_text):
            raise ValueError("answer_choices is missing; a multiple_choice row needs its choices")
        choices = parse_answer_choices(choices_text)
        raw["choices"] = choices
        raw["answer"] = None if _is_empty(target) else _csv_target_to_answer(target, choices)
    else:
        raw["references"] = [] if _is_empty(target) else [target]
    return _make_item(raw, kind, position, row)


# ----------------------------------------------------------------------------- YAML task config


class _FewShotSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    num: int = Field(0, ge=0)
    data: Optional[str] = None
    seed: int = 1234
    delimiter: str = "\n\n"
    multiturn: bool = False


class _GenerationSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_new_tokens: int = Field(64, ge=1)
    stop: list[str] = []


class _DatasetSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: Optional[str] = None
    name: Optional[str] = None
    split: str = "test"
    data_files: Optional[Union[str, list[str], dict[str, Union[str, list[str]]]]] = None
    revision: Optional[str] = None
    from_disk: Optional[str] = None


class _FieldMap(BaseModel):
    """Where each item field lives in a dataset row; dotted paths reach nested fields."""

    model_config = ConfigDict(extra="forbid")
    id: Optional[str] = None
    prompt: str = "prompt"
    choices: str = "choices"
    answer: str = "answer"
    references: str = "references"


class _TaskSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    task: Optional[str] = None
    data: Optional[str] = None
    dataset: Optional[_DatasetSpec] = None
    type: Optional[Literal["multiple_choice", "generation"]] = None
    fields: _FieldMap = _FieldMap()
    target_delimiter: str = ""
    description: str = ""
    fewshot: _FewShotSpec = _FewShotSpec()
    chat_template: bool = False
    system_prompt: Optional[str] = None
    metric: Optional[str] = None
    generation: _GenerationSpec = _GenerationSpec()
    limit: Optional[int] = Field(None, ge=1)


def _read_yaml_spec(path: Path) -> _TaskSpec:
    try:
        raw = yaml.safe_load(read_text(path))
    except yaml.YAMLError as err:
        raise InputError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: a task config must be a mapping (task:, data: or dataset:, ...)")
    try:
        spec = _TaskSpec.model_validate(raw)
    except ValidationError as err:
        raise InputError([f"{path}: {p}" for p in _pydantic_problems(err)]) from None
    if (spec.data is None) == (spec.dataset is None):
        raise InputError(f"{path}: give exactly one of 'data:' (a JSONL or CSV file) or 'dataset:' "
                         "(a Hugging Face dataset)")
    if spec.dataset is not None and spec.type is None:
        raise InputError(f"{path}: a 'dataset:' task needs 'type: multiple_choice' or 'type: generation'")
    return spec


def _settings_from_spec(spec: _TaskSpec, base: Path, skip_bad_rows: bool) -> TaskSettings:
    pool: tuple[Item, ...] = ()
    if spec.fewshot.data:
        pool_items, _ = _read_items(_resolve(base, spec.fewshot.data), skip_bad_rows)
        pool = tuple(i for i in pool_items if i.labelled)
    return TaskSettings(
        target_delimiter=spec.target_delimiter,
        description=spec.description,
        fewshot=FewShot(num=spec.fewshot.num, pool=pool, seed=spec.fewshot.seed,
                        delimiter=spec.fewshot.delimiter, multiturn=spec.fewshot.multiturn),
        chat_template=spec.chat_template,
        system_prompt=spec.system_prompt,
        metric=spec.metric,
        max_new_tokens=spec.generation.max_new_tokens,
        stop=tuple(spec.generation.stop),
    )


def _resolve(base: Path, name: str) -> Path:
    path = Path(name).expanduser()
    return path if path.is_absolute() else base / path


# ----------------------------------------------------------------------------- Hugging Face datasets


def _dig(row: dict, dotted: str) -> Any:
    value: Any = row
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(dotted)
        value = value[part]
    return value


def _mapped_answer(value: Any, choices: list[str]) -> Optional[int]:
    """An index, a digit string, a letter (A, B, ...) or the right choice's text."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, bool):
        raise ValueError(f"answer {value!r} is not an index")
    if isinstance(value, int):
        return value
    text = str(value).strip()
    if text.lstrip("-").isdigit():
        return int(text)
    if value in choices:
        return choices.index(value)
    if len(text) == 1 and text.isalpha() and text.isupper():
        return ord(text) - ord("A")
    raise ValueError(f"answer {_clip(str(value))!r} is not an index, a letter or one of the choices")


def items_from_rows(rows: Iterable[dict], kind: str, fields: Optional[dict] = None, *,
                    source: str = "dataset", skip_bad_rows: bool = False) -> tuple[list[Item], list[SkippedRow]]:
    """Map dataset rows (dicts) to items through a field mapping (see ``_FieldMap``)."""
    fmap = _FieldMap.model_validate(fields or {})
    collector = _Collector(source, skip_bad_rows)
    items = []
    for position, record in enumerate(rows):
        row = f"row {position}"
        row_id = str(_dig(record, fmap.id)) if fmap.id and _has(record, fmap.id) else str(position)
        try:
            raw: dict[str, Any] = {"id": row_id, "prompt": _dig(record, fmap.prompt)}
            if kind == MULTIPLE_CHOICE:
                choices = _dig(record, fmap.choices)
                if isinstance(choices, str):
                    choices = parse_answer_choices(choices)
                raw["choices"] = list(choices)
                raw["answer"] = _mapped_answer(_dig(record, fmap.answer) if _has(record, fmap.answer) else None,
                                               raw["choices"])
            else:
                refs = _dig(record, fmap.references) if _has(record, fmap.references) else []
                raw["references"] = [refs] if isinstance(refs, str) else list(refs or [])
            items.append(_make_item(raw, kind, position, row))
        except KeyError as err:
            collector.bad(position, row, row_id, f"has no field {err.args[0]!r}; fix the 'fields:' mapping "
                          f"(row fields: {', '.join(map(str, record))})")
        except (ValueError, TypeError) as err:
            collector.bad(position, row, row_id, str(err))
    collector.finish()
    return items, collector.skipped


def _has(row: dict, dotted: str) -> bool:
    try:
        _dig(row, dotted)
        return True
    except KeyError:
        return False


def load_hf_rows(spec: _DatasetSpec, base: Path, where: str) -> Any:
    """Load a dataset split: from a ``save_to_disk`` folder or through ``datasets.load_dataset``.

    ``load_dataset`` may reach the Hugging Face Hub; offline, only datasets already in
    the local cache (or local data files) load, and anything else is reported as such.
    """
    try:
        import datasets
    except ImportError:
        raise InputError(f"{where}: 'dataset:' tasks need the 'datasets' package "
                         "(pip install 'mergesmith[all]')") from None
    if spec.from_disk:
        path = _resolve(base, spec.from_disk)
        try:
            loaded = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as err:
            raise InputError(f"{where}: dataset.from_disk {path} could not be read ({err})") from None
        if isinstance(loaded, datasets.DatasetDict):
            if spec.split not in loaded:
                raise InputError(f"{where}: dataset.split {spec.split!r} is not in {path} "
                                 f"(splits: {', '.join(loaded)})")
            loaded = loaded[spec.split]
        return loaded
    if not spec.path:
        raise InputError(f"{where}: dataset needs 'path:' (a hub name or a builder such as json) or 'from_disk:'")
    data_files = spec.data_files
    if isinstance(data_files, str):
        data_files = str(_resolve(base, data_files))
    try:
        return datasets.load_dataset(spec.path, spec.name, split=spec.split, data_files=data_files,
                                     revision=spec.revision)
    except Exception as err:  # the library raises many kinds: connection, missing config, missing split
        raise InputError(f"{where}: could not load dataset {spec.path!r}"
                         + (f" ({spec.name})" if spec.name else "") + f" split {spec.split!r}: "
                         f"{type(err).__name__}: {err}. Offline, only datasets already in the local "
                         "cache or on disk can be loaded.") from None


def task_from_dataset(dataset: Any, name: str, type: str, fields: Optional[dict] = None, *,
                      settings: TaskSettings = TaskSettings(), skip_bad_rows: bool = False,
                      limit: Optional[int] = None) -> Task:
    """A task from an in-memory ``datasets.Dataset`` (or any iterable of dict rows)."""
    if type not in TASK_TYPES:
        raise InputError(f"task {name}: type {type!r}; use multiple_choice or generation")
    _check_limit(limit)
    rows = dataset if limit is None else (r for i, r in zip(range(limit), dataset))
    items, skipped = items_from_rows(rows, type, fields, source=f"dataset for task {name}",
                                     skip_bad_rows=skip_bad_rows)
    task = Task(name=name, type=type, items=items, settings=settings, source=f"dataset:{name}",
                skipped=skipped)
    _check_task(task, f"dataset for task {name}")
    return task


# ----------------------------------------------------------------------------- entry point


def _read_items(path: Path, skip_bad_rows: bool) -> tuple[list[Item], list[SkippedRow]]:
    if not path.is_file():
        raise InputError(f"{path}: no such task file")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return read_jsonl(path, skip_bad_rows)
    if suffix == ".csv":
        return read_competition_csv(path, skip_bad_rows)
    raise InputError(f"{path}: unknown task file type {suffix!r}; use .jsonl, .csv or a .yaml task config")


def _split_by_type(stem: str, items: list[Item], skipped: list[SkippedRow], settings: TaskSettings,
                   source: str) -> list[Task]:
    kinds = [k for k in TASK_TYPES if any(i.type == k for i in items)]
    if len(kinds) <= 1:
        kind = kinds[0] if kinds else MULTIPLE_CHOICE
        return [Task(stem, kind, items, settings, source, skipped)]
    # skipped rows stay with the first task, so that they are counted once
    return [Task(f"{stem}.{k}", k, [i for i in items if i.type == k], settings, source,
                 skipped if n == 0 else []) for n, k in enumerate(kinds)]


def _check_task(task: Task, where: str) -> None:
    if not task.items:
        if task.skipped:
            raise InputError(f"{where}: all {len(task.skipped)} rows were bad and skipped; nothing to evaluate")
        raise InputError(f"{where}: no items; a task file needs at least one row")
    metric = task.settings.metric
    allowed = MC_METRICS if task.type == MULTIPLE_CHOICE else GEN_METRICS
    if metric is not None and metric not in allowed:
        raise InputError(f"{where}: metric {metric!r} is not a {task.type} metric; use one of {', '.join(allowed)}")
    seen: dict[str, str] = {}
    dupes = []
    for item in task.items:
        if item.id in seen:
            dupes.append(f"{where}: {item.row}: id {item.id!r} repeats {seen[item.id]}; ids must be unique")
        seen[item.id] = item.row
    if dupes:
        raise InputError(dupes[:MAX_PROBLEMS_SHOWN])
    fewshot = task.settings.fewshot
    if fewshot.num:
        pool = fewshot.pool or tuple(i for i in task.items if i.labelled)
        if len(pool) < fewshot.num + (0 if fewshot.pool else 1):
            raise InputError(f"{where}: fewshot.num is {fewshot.num} but only {len(pool)} labelled "
                             "examples are available; lower it or give fewshot.data")
    if fewshot.multiturn and not task.settings.chat_template:
        raise InputError(f"{where}: fewshot.multiturn needs chat_template: true")


def load_task(path: Union[str, Path], *, skip_bad_rows: bool = False, limit: Optional[int] = None,
              metric: Optional[dict[str, str]] = None) -> list[Task]:
    """Load one task file (JSONL, competition CSV or YAML config); a mixed file gives two tasks."""
    _check_limit(limit)
    path = Path(path)
    if path.suffix.lower() in (".yaml", ".yml"):
        if not path.is_file():
            raise InputError(f"{path}: no such task file")
        spec = _read_yaml_spec(path)
        base = path.parent
        settings = _settings_from_spec(spec, base, skip_bad_rows)
        name = spec.task or path.stem
        if spec.dataset is not None:
            rows = load_hf_rows(spec.dataset, base, str(path))
            task = task_from_dataset(rows, name, spec.type, spec.fields.model_dump(), settings=settings,
                                     skip_bad_rows=skip_bad_rows, limit=spec.limit or limit)
            task.source = str(path)
            return [task]
        data_path = _resolve(base, spec.data)
        items, skipped = _read_items(data_path, skip_bad_rows)
        if spec.type:
            items = [i for i in items if i.type == spec.type]
        tasks = _split_by_type(name, _limit(items, spec.limit or limit), skipped, settings, str(data_path))
    else:
        data_path = path
        items, skipped = _read_items(path, skip_bad_rows)
        tasks = _split_by_type(path.stem, _limit(items, limit), skipped, TaskSettings(), str(path))
    # precedence: the YAML config's metric, then the caller's (--mc-metric, --gen-metric),
    # then the competition's own for a CSV, then DEFAULT_METRIC (through Task.headline)
    defaults = dict(CSV_DEFAULT_METRIC) if data_path.suffix.lower() == ".csv" else {}
    defaults.update(metric or {})
    for task in tasks:
        if task.settings.metric is None and task.type in defaults:
            task.settings = replace(task.settings, metric=defaults[task.type])
        _check_task(task, str(path))
    return tasks


def _limit(items: list[Item], limit: Optional[int]) -> list[Item]:
    return items if limit is None else items[:limit]


def _limit_problems(limit: Any) -> list[str]:
    """A limit keeps the first N items; zero or a negative N would silently score other items."""
    if limit is None or (isinstance(limit, int) and not isinstance(limit, bool) and limit >= 1):
        return []
    return [f"--limit {limit!r}: must be a whole number of at least 1 (the first N items of each task file are "
            "kept); leave it out to use every item"]


def _check_limit(limit: Any) -> None:
    problems = _limit_problems(limit)
    if problems:
        raise InputError(problems)


def load_tasks(paths: Union[str, Path, Iterable[Union[str, Path]]], *, skip_bad_rows: bool = False,
               limit: Optional[int] = None, metric: Optional[dict[str, str]] = None) -> list[Task]:
    """Load every task file; all problems across files are reported together.

    ``limit`` keeps the first N items of each file (for smoke runs); ``metric`` maps a
    task type to the headline metric of tasks that do not set their own, e.g.
    ``{"generation": "rougeL"}``.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    problems: list[str] = _limit_problems(limit)
    if problems:
        limit = None  # still read every file, so that their problems are reported in the same round
    tasks: list[Task] = []
    for path in paths:
        try:
            tasks.extend(load_task(path, skip_bad_rows=skip_bad_rows, limit=limit, metric=metric))
        except InputError as err:
            problems.extend(err.problems)
    if not problems and not tasks:
        problems.append("no task files given; pass --tasks FILE [FILE ...]")
    names: dict[str, str] = {}
    for task in tasks:
        if task.name in names:
            problems.append(f"{task.source}: task name {task.name!r} is also used by {names[task.name]}; "
                            "rename a file or give it a YAML config with 'task: NAME'")
        names[task.name] = task.source
    if problems:
        raise InputError(problems)
    return tasks
