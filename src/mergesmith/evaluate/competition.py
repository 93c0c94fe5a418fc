"""The LLM Merging Competition's files: the submission, the answer key, and the scorer.

Formats, as the official starter kit (github.com/llm-merging/LLM-Merging,
``llm_merging/evaluation.py`` and ``data/``) writes and reads them:

- **Task files** (``mergesmith.evaluate.tasks`` reads them): columns ``id, input,
  eval_type, answer_choices, target`` in any order; ``answer_choices`` a
  stringified Python list (``"['advertising', 'shipping']"``, what ``repr`` of a
  list of strings gives), empty for generation rows; ``target`` the index of the
  right choice (``1``) or a generation's reference text. The hidden test file has
  no ``target`` column.
- **Submission** (``submission.csv``): ``id,prediction,dummy_field``, one row per
  input row. ``prediction`` is the chosen choice's index for multiple choice
  (``str`` of the kit's predicted index) and the generated text for generation;
  ``dummy_field`` is the constant ``0`` the kit adds for Kaggle. ``plain`` is
  mergesmith's earlier ``id,prediction`` (without the Kaggle column).
- **Answer key** (``test_key.csv``, from ``mergesmith zoo competition``): ``id,
  eval_type, target, answer_choices``. A labelled task file (a validation CSV)
  is a key too: its ``input`` column is ignored.

Scoring (``score_submission``), the competition's metrics:

- multiple choice: accuracy. A prediction is read as the chosen index when it is
  a whole number (``2``, as the kit and ``mergesmith compete`` write it);
  otherwise, when the key has ``answer_choices``, as the choice whose text it
  equals exactly (so a letter ``B`` is right on a task whose choices are
  ``['A', 'B', 'C', 'D']`` and whose target is 1). Anything else (empty, out of
  range, an unknown text) is wrong and counted as invalid.
- generation: ROUGE-L F-measure against the target (``metrics.rouge_l``: the
  ``rouge-score`` library with stemming, as ``mergesmith evaluate`` scores it);
  exact match is reported beside it. An empty prediction scores 0.
- overall: the unweighted mean of the two eval types' scores, the same as the
  macro average ``mergesmith evaluate`` reports for a file that mixes both (one
  task per type, equal weight). The kit does not publish its Kaggle scorer, so
  this combination is our reading of "average over tasks"; the per-row mean
  (``micro``) is reported too.
"""

from __future__ import annotations

import csv
import io
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from mergesmith.errors import InputError, read_text
from mergesmith.evaluate.tasks import GENERATION, MULTIPLE_CHOICE, TASK_TYPES, parse_answer_choices

SUBMISSION_FORMATS = ("kit", "plain")
DEFAULT_SUBMISSION_FORMAT = "kit"
DUMMY_FIELD_VALUE = "0"  # the kit: dp_df["dummy_field"] = 0
KEY_COLUMNS = ("id", "eval_type", "target", "answer_choices")
MAX_IDS_SHOWN = 10
_ABSENT = ("", "none", "nan", "null")


# ----------------------------------------------------------------------------- writing


def submission_header(submission_format: str = DEFAULT_SUBMISSION_FORMAT) -> list[str]:
    if submission_format not in SUBMISSION_FORMATS:
        raise InputError(f"--submission-format {submission_format!r}: not known; use one of "
                         f"{', '.join(SUBMISSION_FORMATS)}")
    return ["id", "prediction"] + (["dummy_field"] if submission_format == "kit" else [])


def submission_row(row_id: str, prediction: str, submission_format: str = DEFAULT_SUBMISSION_FORMAT) -> list[str]:
    return [row_id, prediction] + ([DUMMY_FIELD_VALUE] if submission_format == "kit" else [])


def format_answer_choices(choices: Sequence[str]) -> str:
    """The kit's encoding, ``"['a', 'b']"``: ``repr`` of the list, which ``parse_answer_choices``
    reads back exactly (``ast.literal_eval`` inverts ``repr`` for lists of strings)."""
    return repr([str(c) for c in choices])


def write_csv_atomic(path: Union[str, Path], header: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path:
    """Write a CSV under a temporary name beside ``path``, then rename it into place:
    an interrupted write leaves the previous file (or none), never half a file.

    A NUL character in a field (a small model can generate one) is written as U+FFFD: Python 3.10's
    csv module cannot write NUL at all, and many CSV readers stop at one."""
    path = Path(path)
    rows = [[v.replace("\x00", "\ufffd") if isinstance(v, str) else v for v in row] for row in rows]
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(header)
            writer.writerows(rows)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


# ----------------------------------------------------------------------------- reading


def _read_rows(path: Path, what: str) -> tuple[list[str], list[tuple[int, dict]]]:
    """The header and (row number, record) pairs of a CSV; problems raise one InputError."""
    if not path.is_file():
        raise InputError(f"{path}: no such {what} file")
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with io.StringIO(read_text(path), newline="") as fh:
        reader = csv.DictReader(fh)
        header = list(reader.fieldnames or [])
        rows = [(n, record) for n, record in enumerate(reader, start=1)]
    return header, rows


def _id_list(ids: Sequence[str]) -> str:
    shown = ", ".join(repr(i) for i in ids[:MAX_IDS_SHOWN])
    more = len(ids) - MAX_IDS_SHOWN
    return shown + (f" and {more} more" if more > 0 else "")


def _ids(path: Path, rows: list[tuple[int, dict]], problems: list[str]) -> dict[str, tuple[int, dict]]:
    """Rows by id; empty, duplicate and overlong rows become problems."""
    out: dict[str, tuple[int, dict]] = {}
    dupes: dict[str, list[int]] = {}
    for n, record in rows:
        if None in record:
            problems.append(f"{path}: row {n}: has more cells than the header has columns (an unquoted comma?)")
            continue
        row_id = (record.get("id") or "").strip()
        if not row_id:
            problems.append(f"{path}: row {n}: id is empty")
        elif row_id in out:
            dupes.setdefault(row_id, [out[row_id][0]]).append(n)
        else:
            out[row_id] = (n, record)
    for row_id, where in dupes.items():
        problems.append(f"{path}: id {row_id!r} appears {len(where)} times (rows "
                        f"{', '.join(map(str, where))}); ids must be unique")
    return out


@dataclass(frozen=True)
class KeyRow:
    id: str
    eval_type: str
    target: str  # the reference text, for generation
    answer: Optional[int] = None  # the right choice's index, for multiple choice
    choices: tuple[str, ...] = ()


def read_key(path: Union[str, Path]) -> list[KeyRow]:
    """An answer key: columns ``id, eval_type, target`` and optionally ``answer_choices``
    (others, such as ``input``, are ignored). Every problem is raised at once."""
    path = Path(path)
    header, rows = _read_rows(path, "key")
    problems: list[str] = []
    missing = [c for c in ("id", "eval_type", "target") if c not in header]
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(missing)}; an answer key has columns "
                         f"id, eval_type, target and optionally answer_choices (found: {', '.join(header) or 'none'})"
                         + ("; a hidden test file has no targets: give its key file" if "input" in header else ""))
    by_id = _ids(path, rows, problems)
    keys = []
    for row_id, (n, record) in by_id.items():
        try:
            keys.append(_key_row(row_id, record))
        except ValueError as err:
            problems.append(f"{path}: row {n} (id {row_id}): {err}")
    if not keys and not problems:
        problems.append(f"{path}: no rows; an answer key needs at least one")
    if problems:
        raise InputError(problems)
    return keys


def _key_row(row_id: str, record: dict) -> KeyRow:
    kind = (record.get("eval_type") or "").strip()
    if kind not in TASK_TYPES:
        raise ValueError(f"eval_type is {kind!r}; use multiple_choice or generation")
    target = record.get("target") or ""
    if not target.strip():
        raise ValueError("target is empty; every key row needs the answer")
    if kind == GENERATION:
        return KeyRow(row_id, kind, target)
    choices_text = (record.get("answer_choices") or "").strip()
    # the task reader's words for "absent" (a generation row of the kit's writes None)
    choices = tuple(parse_answer_choices(choices_text)) if choices_text.lower() not in _ABSENT else ()
    answer = _choice_index(target, choices)
    if answer is None:
        raise ValueError(f"target {target!r} is not a choice index" + (" nor one of the choices" if choices else ""))
    if choices and not 0 <= answer < len(choices):
        raise ValueError(f"target {answer} is out of range for {len(choices)} choices")
    return KeyRow(row_id, kind, target, answer, choices)


def _choice_index(text: str, choices: Sequence[str]) -> Optional[int]:
    """A whole number is an index (first, as the kit writes indices); else the choice with this exact text."""
    stripped = text.strip()
    try:
        number = float(stripped)
    except ValueError:
        number = None
    if number is not None and number.is_integer():
        return int(number)
    if text in choices:
        return choices.index(text)
    if stripped in choices:
        return choices.index(stripped)
    return None


def read_submission(path: Union[str, Path]) -> dict[str, str]:
    """A submission's predictions by id: columns ``id, prediction`` and optionally ``dummy_field``."""
    path = Path(path)
    header, rows = _read_rows(path, "submission")
    problems: list[str] = []
    missing = [c for c in ("id", "prediction") if c not in header]
    extra = [c for c in header if c not in ("id", "prediction", "dummy_field")]
    if missing or extra:
        what = []
        if missing:
            what.append(f"missing column(s) {', '.join(missing)}")
        if extra:
            what.append(f"unexpected column(s) {', '.join(extra)}")
        raise InputError(f"{path}: {'; '.join(what)}; a submission has columns id, prediction and optionally "
                         f"dummy_field (found: {', '.join(header) or 'none'})")
    by_id = _ids(path, rows, problems)
    if problems:
        raise InputError(problems)
    return {row_id: record.get("prediction") or "" for row_id, (_, record) in by_id.items()}


# ----------------------------------------------------------------------------- scoring


@dataclass
class TypeScore:
    eval_type: str
    metric: str  # the headline: accuracy, or rougeL
    score: Optional[float]
    n: int
    metrics: dict[str, float] = field(default_factory=dict)  # headline and the others (exact_match)
    empty: int = 0  # predictions left empty (rows compete did not run)
    invalid: int = 0  # multiple choice: not an index in range nor a choice's text


@dataclass
class ScoreReport:
    submission: str
    key: str
    by_type: dict[str, TypeScore]
    overall: Optional[float]  # the mean of the per-type scores
    micro: Optional[float]  # the mean over rows of each row's headline value
    n_rows: int

    def to_dict(self) -> dict[str, Any]:
        return {"submission": self.submission, "key": self.key, "overall": self.overall, "micro": self.micro,
                "n_rows": self.n_rows, "by_type": {k: asdict(v) for k, v in self.by_type.items()},
                "overall_is": "unweighted mean of the per-eval_type scores"}

    def table(self) -> str:
        lines = [f"{'eval_type':<16} {'rows':>5}  {'metric':<9} {'score':>7}  also"]
        for t in self.by_type.values():
            also = [f"{m} {v:.4f}" for m, v in t.metrics.items() if m != t.metric]
            if t.empty:
                also.append(f"{t.empty} empty")
            if t.invalid:
                also.append(f"{t.invalid} invalid")
            lines.append(f"{t.eval_type:<16} {t.n:>5}  {t.metric:<9} {_fmt(t.score):>7}  {', '.join(also)}")
        lines.append(f"{'overall':<16} {self.n_rows:>5}  {'mean':<9} {_fmt(self.overall):>7}  "
                     f"per-row mean {_fmt(self.micro)}")
        return "\n".join(lines)


def _fmt(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.4f}"


def rouge_problems(keys: Sequence[KeyRow], where: str) -> list[str]:
    from mergesmith.evaluate.metrics import rouge_available

    if any(k.eval_type == GENERATION for k in keys) and not rouge_available():
        return [f"{where}: generation rows are scored by ROUGE-L, which needs the rouge-score package: "
                "pip install 'mergesmith[eval]'"]
    return []


def score_submission(submission: Union[str, Path], key: Union[str, Path]) -> ScoreReport:
    """Score a submission against an answer key (see the module docstring for the rules).

    Every problem (columns, empty or duplicate ids in either file, ids of the key
    missing from the submission, ids of the submission not in the key, bad key
    rows, rouge-score missing) is raised as one ``InputError``.
    """
    from mergesmith.evaluate.metrics import exact_match, rouge_l

    problems: list[str] = []
    keys: Optional[list[KeyRow]] = None
    predictions: Optional[dict[str, str]] = None
    try:
        keys = read_key(key)
    except InputError as err:
        problems += err.problems
    try:
        predictions = read_submission(submission)
    except InputError as err:
        problems += err.problems
    if keys is not None and predictions is not None:  # ids can be matched only when both files read
        key_ids = [k.id for k in keys]
        known = set(key_ids)
        missing = [i for i in key_ids if i not in predictions]
        unknown = [i for i in predictions if i not in known]
        if missing:
            problems.append(f"{submission}: {len(missing)} id(s) of the key {key} have no row: {_id_list(missing)}; "
                            "a submission needs one row per key row (an empty prediction scores 0)")
        if unknown:
            problems.append(f"{submission}: {len(unknown)} id(s) are not in the key {key}: {_id_list(unknown)}; "
                            "is it the key of the same task file?")
    problems += rouge_problems(keys or [], str(key))
    if problems or keys is None or predictions is None:
        raise InputError(problems)

    values: dict[str, list[float]] = {MULTIPLE_CHOICE: [], GENERATION: []}
    exact: list[float] = []
    empty = {MULTIPLE_CHOICE: 0, GENERATION: 0}
    invalid = 0
    for k in keys:
        prediction = predictions[k.id]
        if not prediction.strip():  # a row compete did not run: wrong, and counted apart
            empty[k.eval_type] += 1
            values[k.eval_type].append(0.0)
            if k.eval_type == GENERATION:
                exact.append(0.0)
        elif k.eval_type == MULTIPLE_CHOICE:
            chosen = _choice_index(prediction, k.choices)
            valid = chosen is not None and (not k.choices or 0 <= chosen < len(k.choices))
            if not valid:
                invalid += 1
            values[MULTIPLE_CHOICE].append(float(valid and chosen == k.answer))
        else:
            values[GENERATION].append(rouge_l(prediction, [k.target]))
            exact.append(exact_match(prediction, [k.target]))
    by_type: dict[str, TypeScore] = {}
    if values[MULTIPLE_CHOICE]:
        acc = sum(values[MULTIPLE_CHOICE]) / len(values[MULTIPLE_CHOICE])
        by_type[MULTIPLE_CHOICE] = TypeScore(MULTIPLE_CHOICE, "accuracy", acc, len(values[MULTIPLE_CHOICE]),
                                             {"accuracy": acc}, empty[MULTIPLE_CHOICE], invalid)
    if values[GENERATION]:
        rouge = sum(values[GENERATION]) / len(values[GENERATION])
        by_type[GENERATION] = TypeScore(GENERATION, "rougeL", rouge, len(values[GENERATION]),
                                        {"rougeL": rouge, "exact_match": sum(exact) / len(exact)}, empty[GENERATION])
    scores = [t.score for t in by_type.values() if t.score is not None]
    every = values[MULTIPLE_CHOICE] + values[GENERATION]
    return ScoreReport(str(submission), str(key), by_type, sum(scores) / len(scores) if scores else None,
                       sum(every) / len(every) if every else None, len(keys))
