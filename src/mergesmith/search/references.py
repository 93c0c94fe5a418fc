"""Reference models: evaluated in full beside the search, never searched.

``--reference MODEL`` names a model to compare the search's best recipe with: a model folder, a
``model+adapter`` reference, or a routed model folder (``mergesmith route``). Each is evaluated once,
in the search's own process before the loop starts, on every validation item (and every test item
with ``--test-tasks``), inside the search's deadline. ``summary.json: references`` records its
scores beside the best recipe's ``final`` scores; with ``--fitness irt`` its validation answers
also join the item fit's calibration, as the base's and the experts' do.

A reference's results are kept in ``OUT/references/<k>/`` and reused by ``--resume`` when the
list of references is unchanged.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from mergesmith.errors import InputError
from mergesmith.search.fitness import answers_of, evaluation_summary

INDEX = "references.json"


def reference_problems(refs: list[str]) -> list[str]:
    """Why a ``--reference`` cannot be evaluated (a missing folder, a routed folder whose experts
    changed, ...), all of them, before anything runs."""
    from mergesmith.evaluate.model import model_path_problems
    from mergesmith.route.folder import is_routed_folder, read_routed

    problems: list[str] = []
    if len(set(refs)) != len(refs):
        problems.append(f"--reference: {', '.join(sorted({r for r in refs if refs.count(r) > 1}))} "
                        "given more than once")
    for ref in refs:
        if is_routed_folder(ref):
            try:
                routed = read_routed(ref)
            except InputError as err:
                problems += [f"--reference {ref}: {p}" for p in err.problems]
                continue
            if routed.kind == "oracle":
                problems.append(f"--reference {ref}: an oracle routed folder needs each item's task name "
                                "to match its experts' skills; it is an upper bound for tables, not a "
                                "reference for a search")
        else:
            problems += [f"--reference {ref}: {p}" for p in model_path_problems(str(ref))]
    return problems


def evaluate_references(refs: list[str], tasks: list, test_tasks: list, weights: dict[str, float],
                        deadline: float, out: Path, batch_size: int, log: Callable[[str], None]) -> list[dict]:
    """Each reference on every validation (and test) item, in this process, before ``deadline``.

    Returns one record per reference: ``model``, ``routed`` (its routing report, for a routed
    folder), ``validation`` and ``test`` (``macro``, ``scores``, ``weighted``, ``complete``),
    ``seconds``, and ``answers`` (``{task: [[position, 1.0 or 0.0], ...]}`` on validation, as the
    workers report them, for the IRT fit; not written to the summary)."""
    from mergesmith.evaluate import evaluate

    saved = _saved(out, refs)
    if saved is not None:
        log(f"references: reusing the evaluations in {out / INDEX}")
        return saved
    records = []
    for k, ref in enumerate(refs):
        started = time.monotonic()
        record: dict[str, Any] = {"model": ref}
        for label, group in (("validation", tasks), ("test", test_tasks)):
            if not group:
                continue
            result = evaluate(ref, group, batch_size=batch_size, progress=False, bootstrap=0,
                              deadline=deadline)
            result.save(out / "references" / str(k) / label)
            record[label] = evaluation_summary(result, weights if label == "validation" else None)
            if label == "validation":
                record["answers"] = answers_of(result)
            if result.settings.get("routed"):
                record.setdefault("routed", result.settings["routed"])
        record["seconds"] = round(time.monotonic() - started, 3)
        records.append(record)
        validation = record.get("validation") or {}
        log(f"reference {ref}: full validation {_fmt(validation.get('macro'))}"
            + ("" if validation.get("complete", True) else " (partial: the budget ran out)")
            + f" in {record['seconds']:.1f} s")
    (out / INDEX).write_text(json.dumps({"refs": list(refs), "records": records}) + "\n")
    return records


def public(records: list[dict]) -> list[dict]:
    """The records without their per-item answers, for ``summary.json``."""
    return [{k: v for k, v in r.items() if k != "answers"} for r in records]


def _saved(out: Path, refs: list[str]) -> list[dict] | None:
    path = out / INDEX
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    if saved.get("refs") != list(refs):
        return None
    return saved["records"]


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}"
