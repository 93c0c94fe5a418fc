"""Vocabulary rows of the benchmark (``mergesmith bench --vocab ROWS``, docs/vocab.md).

The zoo's two experts with tokenizers of their own (``zoo/vocab.py``: ``added``, ``retokenized``)
evaluated, merged with the other experts, and given the base's tokenizer back:

- ``experts``: ``vocab-expert:<kind>:<skill>``, each evaluated on every test task with its own
  tokenizer (the harness loads the tokenizer from the model folder);
- ``union``, ``base``: ``vocab-merge:union`` and ``vocab-merge:base``, ``VOCAB_METHOD`` over the eight
  trained experts with the two skills' experts replaced by the vocabulary experts, the recipe's
  ``tokenizer_source`` union (every token of every model) or base (the base's vocabulary only);
- ``shared``: ``vocab-merge:shared``, the same method over the eight ordinary experts, which share
  the base's tokenizer: the reference;
- ``surgeon``: ``surgeon:<approximation>``, the skill's ordinary expert (the base's tokenizer) given
  the retokenized tokenizer by ``tokensurgeon`` (donor: the model pretrained with that tokenizer,
  ``zoo/vocab.py``) with omp, mean or zero rows for the tokens it lacks, no training; the table
  reports the accuracy kept on its skill against the ordinary expert's. (This direction replaces a
  third of the rows, 541 of 1536 at the default size; the way back, to the base's tokenizer,
  replaces only the few base tokens the retokenized vocabulary lacks, 29 of 1024, and the first
  measurement showed the three approximations equal there.)

Merge rows choose ``VOCAB_METHOD``'s hyperparameters on validation as the merge rows of the table do
(the same grid); test data is never read while choosing.
"""

from __future__ import annotations

import json
import shutil
import statistics
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from mergesmith.errors import InputError

if TYPE_CHECKING:
    from mergesmith.zoo.bench import ExtraRow as Row

VOCAB_METHOD = "task_arithmetic"
TOKENIZER_SOURCES = ("union", "base")
APPROXIMATIONS = ("omp", "mean", "zero")
VOCAB_ROWS = ("experts", *TOKENIZER_SOURCES, "shared", "surgeon")


def parse_vocab_rows(text: str) -> tuple[str, ...]:
    """'all' or comma-separated names of ``VOCAB_ROWS``; every unknown name is reported at once."""
    if text.strip() == "all":
        return VOCAB_ROWS
    rows = tuple(r.strip() for r in text.split(",") if r.strip())
    unknown = [r for r in rows if r not in VOCAB_ROWS]
    if unknown:
        raise InputError(f"--vocab: {', '.join(unknown)} not a vocabulary row; choose 'all' or from "
                         f"{', '.join(VOCAB_ROWS)}")
    return rows


# ----------------------------------------------------------------------------- models


def vocab_zoo(zoo, experts: dict[str, Path]):
    """``zoo`` whose experts of the two vocabulary skills are the vocabulary experts."""
    from mergesmith.zoo.vocab import skill_of

    return replace(zoo, experts={**zoo.experts, **{skill_of(kind): path for kind, path in experts.items()}})


def vocab_recipe(zoo, experts: dict[str, Path], source: str, point: dict, seed: int) -> dict:
    """``VOCAB_METHOD``'s recipe over the trained experts, the vocabulary experts in place of their
    skills' experts, with ``tokenizer_source: source``."""
    from mergesmith.zoo.bench import recipe_for

    return {**recipe_for(vocab_zoo(zoo, experts), VOCAB_METHOD, point, seed), "tokenizer_source": source}


def merged_model(recipe: dict, folder: Path, device: str) -> Path:
    import warnings

    from mergesmith.zoo.bench import merge_into

    with warnings.catch_warnings():
        # the engine's note on the output vocabulary says the same for every point of the grid
        warnings.filterwarnings("ignore", message="vocabulary: ", category=UserWarning)
        merge_into(recipe, folder, device)
    return folder


def surgeon_model(model: Path, donor: Path, approximation: str, folder: Path) -> Path:
    """``model`` with ``donor``'s tokenizer by ``tokensurgeon``, its missing rows by ``approximation``."""
    from mergesmith.vocab.transplant import SurgeonOptions, tokensurgeon

    shutil.rmtree(folder, ignore_errors=True)
    tokensurgeon(model, donor, folder, SurgeonOptions(approximation=approximation, progress=False))
    return folder


# ----------------------------------------------------------------------------- the rows




@dataclass(frozen=True)
class VocabRows:
    """The vocabulary rows of a bench (``BenchConfig.extra_rows``): ``names`` from ``VOCAB_ROWS``."""

    names: tuple[str, ...]

    def rows(self, cfg, zoo, seed: int, val, cache, work: Path, result, log: Callable[[str], None]) -> Iterator[Row]:
        return vocab_rows(self.names, cfg, zoo, seed, val, cache, work, result, log)

    def section(self, results, trained: tuple[str, ...], heldout: tuple[str, ...], generation: bool) -> list[str]:
        return vocab_section(results, trained, heldout, generation)


def vocab_rows(rows: tuple[str, ...], cfg, zoo, seed: int, val, cache, work: Path, result,
               log: Callable[[str], None]) -> Iterator[Row]:
    """Yield ``rows``, each once its hyperparameters are chosen (recorded in ``result.chosen`` and
    ``result.validation``). The bench evaluates each model, then removes it."""
    from mergesmith.zoo.bench import GRIDS, mean, recipe_for, score, select, task_set_key
    from mergesmith.zoo.vocab import KINDS, build_vocab_experts, skill_of

    experts = build_vocab_experts(zoo, cfg.device, progress=cfg.progress)
    if "experts" in rows:
        for kind in KINDS:
            path = experts[kind]
            yield f"vocab-expert:{kind}:{skill_of(kind)}", str(path), lambda f, p=path: p
    scratch = work / "vocab-val" / f"seed{seed}"
    grid, val_key = GRIDS[VOCAB_METHOD], task_set_key(val)
    for source in (r for r in rows if r in TOKENIZER_SOURCES):
        trials = []
        for i, point in enumerate(grid if len(grid) > 1 else []):
            recipe = vocab_recipe(zoo, experts, source, point, seed)
            key = f"{zoo.root}|{json.dumps(recipe, sort_keys=True)}|validation|limit={cfg.val_limit}|{val_key}"

            def run(recipe=recipe, i=i) -> dict:
                folder = scratch / f"{source}-{i}"
                try:
                    return score(merged_model(recipe, folder, cfg.device), val, cfg.device, cfg.batch_size)
                finally:
                    shutil.rmtree(folder, ignore_errors=True)

            scores = cache.get_or_run(key, run)
            trials.append({"params": point, "validation": round(mean(scores.values()), 4)})
        # as bench.select: the best validation accuracy, the first point of the grid on a tie
        best = max(range(len(trials)), key=lambda i: (trials[i]["validation"], -i)) if trials else 0
        name = f"vocab-merge:{source}"
        result.chosen[name], result.validation[name] = grid[best], trials
        log(f"seed {seed}: {name:22s} chose {grid[best]}")
        recipe = vocab_recipe(zoo, experts, source, grid[best], seed)
        yield (name, f"{zoo.root}|{json.dumps(recipe, sort_keys=True)}",
               lambda f, r=recipe: merged_model(r, f, cfg.device))
    if "shared" in rows:
        best, trials = select(cfg, zoo, VOCAB_METHOD, seed, val, cache, scratch, log)
        name = "vocab-merge:shared"
        result.chosen[name], result.validation[name] = best, trials
        log(f"seed {seed}: {name:22s} chose {best}")
        recipe = recipe_for(zoo, VOCAB_METHOD, best, seed)
        yield (name, f"{zoo.root}|{json.dumps(recipe, sort_keys=True)}",
               lambda f, r=recipe: merged_model(r, f, cfg.device))
    if "surgeon" in rows:
        from mergesmith.vocab.transplant import SurgeonOptions

        from mergesmith.zoo.vocab import RETOKENIZED_SKILL, vocab_folders

        expert, donor, k = zoo.experts[RETOKENIZED_SKILL], vocab_folders(zoo)["donor"], SurgeonOptions().k
        for approximation in APPROXIMATIONS:
            yield (f"surgeon:{approximation}", f"{expert}|tokensurgeon|{donor}|{approximation}|k={k}",
                   lambda f, a=approximation: surgeon_model(expert, donor, a, f))


# ----------------------------------------------------------------------------- the report


def _mean_sd(values: list[float]) -> str:
    m = sum(values) / len(values)
    return f"{m:.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{m:.3f}"


def vocab_section(results, trained: tuple[str, ...], heldout: tuple[str, ...], generation: bool) -> list[str]:
    """Markdown for table.md: the vocabulary experts and merges side by side, and the accuracy the
    skill's ordinary expert keeps with the retokenized tokenizer. Empty when the run had none."""
    from mergesmith.zoo.vocab import RETOKENIZED_SKILL

    names = list(results[0].scores)
    rows = [n for n in names if n.startswith(("vocab-expert:", "vocab-merge:"))]
    surgeons = [n for n in names if n.startswith("surgeon:")]
    if not rows and not surgeons:
        return []
    forms = ("mc", "gen") if generation else ("mc",)

    def avg(r, name: str, form: str, skills) -> float:
        return sum(r.scores[name][form][s] for s in skills) / len(skills)

    parts = ["", "## Vocabulary rows (docs/vocab.md, \"In the benchmark\")", ""]
    if rows:
        cols = [f"{f} {a}" for f in forms for a in ("avg_trained", "avg_heldout")]
        parts += ["`vocab-expert:<kind>:<skill>`: the experts with tokenizers of their own, each with its own "
                  "tokenizer, and their own skill's score (`own`) beside the ordinary expert's. `vocab-merge:union` "
                  f"and `:base`: {VOCAB_METHOD} over the trained experts with those two in place of their skills' "
                  "experts, `tokenizer_source` union or base; `vocab-merge:shared`: the same method over the "
                  "ordinary experts (one tokenizer). mc: multiple-choice accuracy; gen: greedy exact match.", "",
                  "| row | " + " | ".join(cols) + " | mc own | mc own, ordinary expert |",
                  "|---" * (len(cols) + 3) + "|"]
        for name in rows:
            cells = [_mean_sd([avg(r, name, f, skills) for r in results])
                     for f in forms for skills in (trained, heldout)]
            if name.startswith("vocab-expert:"):
                skill = name.split(":")[2]
                cells += [_mean_sd([r.scores[name]["mc"][skill] for r in results]),
                          _mean_sd([r.scores[f"expert:{skill}"]["mc"][skill] for r in results])]
            else:
                cells += ["-", "-"]
            parts.append(f"| {name} | " + " | ".join(cells) + " |")
    reference = f"expert:{RETOKENIZED_SKILL}"
    if surgeons and reference in names:
        parts += ["", f"The ordinary `{RETOKENIZED_SKILL}` expert given the retokenized tokenizer by `tokensurgeon` "
                  f"(no training): accuracy kept = score(surgeon row, on {RETOKENIZED_SKILL}) / score({reference}, "
                  f"on {RETOKENIZED_SKILL}), per seed, then the mean.", "",
                  "| row | " + " | ".join(f"{f} kept | {f} own score" for f in forms) + " |",
                  "|---" * (2 * len(forms) + 1) + "|"]
        for name in [*surgeons, reference]:
            cells = []
            for form in forms:
                own = [r.scores[name][form][RETOKENIZED_SKILL] for r in results]
                ref = [r.scores[reference][form][RETOKENIZED_SKILL] for r in results]
                kept = [a / e for a, e in zip(own, ref) if e > 0]  # a seed whose expert scored 0 keeps nothing
                cells += [_mean_sd(kept) if kept else "-", _mean_sd(own)]
            parts.append(f"| {name} | " + " | ".join(cells) + " |")
    return parts
