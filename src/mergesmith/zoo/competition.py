"""The zoo's tasks as an LLM Merging Competition task set (``mergesmith zoo competition``).

Three CSV files, in the starter kit's shapes (see ``mergesmith.evaluate.competition``):

- ``validation.csv``: the validation split, labelled: ``id,input,target,answer_choices,eval_type``
  (the column order of the kit's ``data/validation/*.csv``);
- ``test.csv``: the test split, hidden: ``id,input,eval_type,answer_choices``, no
  ``target`` (the kit's ``data/test.csv``);
- ``test_key.csv``: the test answers, ``id,eval_type,target,answer_choices``, what
  ``mergesmith score`` reads.

Every skill, trained and held-out, is in both splits. The zoo writes each item in
two forms (multiple choice and generation, same id); here each item appears once,
in one form, so that a file mixes both kinds as the competition's does: within a
skill and split, the items are ordered by a hash of (zoo seed, split, skill, id)
and the first half (rounded up) become multiple-choice rows, the rest generation
rows. The choice of an item depends only on the seed and the ids of its skill's
items, so a skill with at least two items has both kinds.

``answer_choices`` is the ``repr`` of the choice list and ``target`` the index of the
right choice (multiple choice) or the (first) reference text (generation), which
``mergesmith.evaluate.tasks.read_competition_csv`` reads back to the same items.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Union

from mergesmith.errors import InputError
from mergesmith.evaluate.competition import KEY_COLUMNS, format_answer_choices, write_csv_atomic
from mergesmith.evaluate.tasks import GENERATION, MULTIPLE_CHOICE, Item, read_jsonl

if TYPE_CHECKING:  # build imports torch; this module only reads the zoo's task files
    from mergesmith.zoo.build import Zoo

VALIDATION_COLUMNS = ("id", "input", "target", "answer_choices", "eval_type")
TEST_COLUMNS = ("id", "input", "eval_type", "answer_choices")
FILES = {"validation.csv": ("validation", VALIDATION_COLUMNS), "test.csv": ("test", TEST_COLUMNS),
         "test_key.csv": ("test", KEY_COLUMNS)}
# the zoo's task forms, as Zoo.tasks[split][form] names them
FORMS = {MULTIPLE_CHOICE: "mc", GENERATION: "gen"}
# words the task reader takes for "no target"; a reference equal to one would read back as unlabelled
_EMPTY_WORDS = ("", "none", "nan", "null")


@dataclass(frozen=True)
class Row:
    """One competition row: the zoo item and the skill it comes from."""

    skill: str
    item: Item

    def cells(self) -> dict[str, str]:
        item = self.item
        if item.type == MULTIPLE_CHOICE:
            target, choices = str(item.answer), format_answer_choices(item.choices)
        else:
            target, choices = item.references[0], ""
        return {"id": item.id, "input": item.prompt, "eval_type": item.type, "answer_choices": choices,
                "target": target}


def _order(seed: int, split: str, skill: str, item_id: str) -> str:
    return hashlib.sha256(f"competition|{seed}|{split}|{skill}|{item_id}".encode()).hexdigest()


def _items(path: Path, skill: str, split: str) -> dict[str, Item]:
    items, _ = read_jsonl(path)
    unlabelled = [i.id for i in items if not i.labelled]
    if unlabelled:
        raise InputError(f"{path}: zoo {split} items of {skill} without an answer ({', '.join(unlabelled[:5])}); "
                         "rebuild the zoo (mergesmith zoo build --rebuild)")
    return {i.id: i for i in items}


def competition_rows(zoo: "Zoo", split: str) -> list[Row]:
    """The split's rows, skill by skill (``zoo.skills`` order), each item in one form."""
    rows: list[Row] = []
    for skill in zoo.skills:
        forms = {}
        for kind, form in FORMS.items():
            files = zoo.task_files(split, form, [skill]) if form in zoo.tasks.get(split, {}) else []
            forms[kind] = _items(files[0], skill, split) if files else {}
        mc, gen = forms[MULTIPLE_CHOICE], forms[GENERATION]
        both = [i for i in mc if i in gen]
        ranked = sorted(both, key=lambda i: _order(zoo.seed, split, skill, i))
        as_mc = set(ranked[: (len(ranked) + 1) // 2])
        # items one form lacks go to the form that has them; the file order is the zoo's
        ids = list(dict.fromkeys([*mc, *gen]))
        for item_id in ids:
            use_mc = item_id in as_mc or item_id not in gen
            rows.append(Row(skill, mc[item_id] if use_mc else gen[item_id]))
    bad = [r.item.id for r in rows if r.item.type == GENERATION
           and r.item.references[0].strip().lower() in _EMPTY_WORDS]
    if bad:
        raise InputError(f"zoo {split} items {', '.join(bad[:5])}: the reference reads as 'no target' in a "
                         "competition CSV; such an item cannot be written as a generation row")
    repeated = [i for i, n in Counter(r.item.id for r in rows).items() if n > 1]
    if repeated:  # one file holds every skill, so ids must be unique across skills
        raise InputError(f"zoo {split} items: id(s) {', '.join(repeated[:5])} appear in more than one skill; "
                         "a competition file needs unique ids")
    return rows


def competition_problems(out: Union[str, Path], overwrite: bool = False) -> list[str]:
    """Why the files cannot be written into ``out`` (checked before the zoo is built)."""
    from mergesmith.checks import output_dir_problems

    problems = output_dir_problems(out)
    if problems:
        return problems
    folder = Path(out).expanduser()
    for name in FILES:
        path = folder / name
        if path.is_dir():
            problems.append(f"--out {out}: {path} is a folder; remove it or choose another --out")
        elif path.exists() and not overwrite:
            problems.append(f"--out {out}: {name} already exists; pass --overwrite to replace it, "
                            "or choose another --out")
    return problems


@dataclass(frozen=True)
class WrittenFile:
    path: Path
    rows: int
    multiple_choice: int
    generation: int
    per_skill: dict[str, tuple[int, int]]  # skill -> (multiple-choice rows, generation rows)


def write_competition(zoo: "Zoo", out: Union[str, Path], *, overwrite: bool = False) -> list[WrittenFile]:
    """Write ``validation.csv``, ``test.csv`` and ``test_key.csv`` into ``out``.

    Each file is written under a temporary name and renamed into place, after all
    three were prepared, so a failure leaves the folder as it was (or with whole
    files only). Existing files are replaced only with ``overwrite``.
    """
    problems = competition_problems(out, overwrite)
    if problems:
        raise InputError(problems)
    folder = Path(out).expanduser()
    splits = {split: competition_rows(zoo, split) for split in ("validation", "test")}
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (split, columns) in FILES.items():
        rows = splits[split]
        body = [[r.cells()[c] for c in columns] for r in rows]
        write_csv_atomic(folder / name, columns, body)
        per_skill: dict[str, tuple[int, int]] = {}
        for r in rows:
            mc, gen = per_skill.get(r.skill, (0, 0))
            per_skill[r.skill] = (mc + (r.item.type == MULTIPLE_CHOICE), gen + (r.item.type == GENERATION))
        written.append(WrittenFile(folder / name, len(rows), sum(v[0] for v in per_skill.values()),
                                   sum(v[1] for v in per_skill.values()), per_skill))
    return written
