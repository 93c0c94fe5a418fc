"""The data-aware and learned rows of ``mergesmith bench``: their data, and learning cached like merges.

Rows and the data each one sees (never a test file):

- ``regmean``, ``regmean_plusplus``, ``fisher``: statistics of each expert on **its own skill's
  train file** (``zoo.tasks["train"]["gen"][skill]``), given as ``models[i].calibration`` by
  ``calibration_block``; their ``alpha`` is chosen on validation like any other hyperparameter.
  Prompts only by default; with ``mergesmith bench --calibration-answers`` each prompt is
  followed by its answer (``calibration.include_answers``), through a task config that gives the
  train file the separating space its stripped references lost (``answer_task_file``), so the
  sequences are the experts' own fine-tuning text. The statistics are cached beside the zoo
  (``<zoo root>/calibration``), so other ``--out`` folders and reruns reuse them.
- ``adamerging``: layer-wise AdaMerging (``learn.adamerging``) of a ``task_arithmetic`` recipe
  over the base and the experts, learned on the **unlabeled validation prompts** of the trained
  skills (multiple-choice form: the entropy over the choices); the learned recipe is merged.
- ``dam``: DAM (``learn.dam``) on the experts, each distilled on its own skill's train prompts
  (prompts and answers with ``--calibration-answers``, the same task configs); the written
  ``dam`` recipe and coefficient file are merged.

Learning is the expensive step, so like an evaluation it is cached under ``--out``/work
(``EvalCache``, keyed by the zoo, the method, its settings and its data files): a rerun reads the
learned recipe back. A DAM entry whose coefficient file is gone is learned again.

The settings are per zoo size (``LEARN_SETTINGS``): at ``test`` size a few steps, so that the
suite runs the rows end to end in seconds; they were set for run time, never tuned on test.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

LEARNED_ROWS = ("adamerging", "dam")  # rows whose recipe is learned before it is merged


@dataclass(frozen=True)
class LearnSettings:
    """How much data and how many steps the data-aware rows use, for one zoo size."""

    calibration_samples: int = 256  # per expert: FusionBench's num_regmean_examples
    calibration_max_length: int = 128  # the zoo's training block
    # The authors' script (EnnengYang/AdaMerging, main_layer_wise_adamerging.py) runs 500 Adam steps at
    # lr 1e-3, each on 32 images per task; FusionBench 1000 steps of 16. We run their 500 steps at their
    # lr on 8 prompts per task: a step over the eight tasks takes about 0.5 s on two idle cores, so
    # the row learns in about 4.5 minutes. (Until December 2026 the bench ran 24 steps at lr 1/24,
    # sized for a machine loaded to a minute per step; docs/zoo.md has both results.)
    adamerging_steps: int = 500
    adamerging_lr: float = 1e-3
    adamerging_batch_size: int = 8
    # DAM's one epoch over its data: 256 items per expert (learn.dam's default; as many steps), about
    # 70 s here. (Until December 2026: 32.)
    dam_samples: int = 256
    dam_epochs: int = 1
    dam_max_length: int = 128


# "default" was sized so that every data-aware row fits in minutes on two CPU cores (docs/zoo.md).
LEARN_SETTINGS: dict[str, LearnSettings] = {
    "test": LearnSettings(calibration_samples=32, calibration_max_length=96, adamerging_steps=4,
                          adamerging_lr=1 / 4, adamerging_batch_size=8, dam_samples=6, dam_max_length=96),
}


def settings_for(size: str) -> LearnSettings:
    return LEARN_SETTINGS.get(size, LearnSettings())


def train_file(zoo: Any, skill: str) -> Path:
    """The expert's own training data: the only per-expert data that is neither validation nor test."""
    return Path(zoo.tasks["train"]["gen"][skill])


def answer_task_file(zoo: Any, skill: str) -> Path:
    """A task config over the expert's train file whose answers read as in fine-tuning.

    The zoo's experts were fine-tuned on ``prompt + answer`` with the answer's leading
    space (" 42", ``zoo.train.encode_examples``), but the train file's references are
    stripped ("42", ``build._task_rows``) and a bare JSONL task has no target delimiter:
    calibrating on it would glue the answer to the prompt ("12 + 30 =42"). The config sets
    ``target_delimiter: " "``, so the calibration sequence is the fine-tuning text again.
    Written beside the zoo's statistics (deterministic content, replaced atomically).
    """
    import os

    import yaml

    path = Path(zoo.root) / "calibration" / "answers" / f"{skill}.yml"
    text = yaml.safe_dump({"task": f"{skill}-train", "data": str(train_file(zoo, skill).resolve()),
                           "target_delimiter": " "}, sort_keys=False)
    if not path.is_file() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, path)
    return path


def expert_data_file(zoo: Any, skill: str, include_answers: bool) -> Path:
    """The expert's own calibration data: its train file, as a task config when answers are included."""
    return answer_task_file(zoo, skill) if include_answers else train_file(zoo, skill)


def calibration_block(zoo: Any, recipe: dict[str, Any], include_answers: bool = False) -> dict[str, Any]:
    """``recipe`` (one model entry per trained skill, in ``zoo.trained`` order) with each expert's own
    train file as its calibration data (prompts, or prompts and answers), and the statistics cached
    beside the zoo."""
    s = settings_for(zoo.size)
    for skill, entry in zip(zoo.trained, recipe["models"]):
        entry["calibration"] = {"files": [str(expert_data_file(zoo, skill, include_answers))]}
    recipe["calibration"] = {"samples": s.calibration_samples, "max_length": s.calibration_max_length,
                             "cache_dir": str(Path(zoo.root) / "calibration")}
    if include_answers:  # absent otherwise: prompt-only recipes, and their cache keys, stay as they were
        recipe["calibration"]["include_answers"] = True
    return recipe


# ----------------------------------------------------------------------------- learned rows


def learn_row(zoo: Any, method: str, seed: int, *, cache: Any, work: Path, device: str, val_limit: Optional[int],
              progress: bool, log: Callable[[str], None], include_answers: bool = False
              ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The learned recipe of row ``method`` (learned now, or read from ``cache``) and a summary of the
    learning (seconds, steps, objective), for the table's notes. ``include_answers`` applies to DAM
    (its experts' data); AdaMerging learns on unlabeled prompts by definition and ignores it."""
    s = settings_for(zoo.size)
    if method == "adamerging":
        data = [str(f) for f in zoo.task_files("validation", "mc", list(zoo.trained))]
        knobs = {"steps": s.adamerging_steps, "lr": s.adamerging_lr, "batch_size": s.adamerging_batch_size,
                 "samples": val_limit}
    elif method == "dam":
        data = [str(expert_data_file(zoo, skill, include_answers)) for skill in zoo.trained]
        knobs = {"samples": s.dam_samples, "epochs": s.dam_epochs, "max_length": s.dam_max_length}
        if include_answers:  # only then: prompt-only entries keep their cache keys
            knobs["include_answers"] = True
    else:
        raise ValueError(f"{method} is not a learned row; known: {', '.join(LEARNED_ROWS)}")
    key = f"{zoo.root}|learn|{method}|seed={seed}|{json.dumps(knobs, sort_keys=True)}|{json.dumps(data)}"
    folder = work / "learned" / f"{method}-{cache._path(key).stem}"
    entry = cache._path(key)
    if entry.exists() and not _still_there(json.loads(entry.read_text())["value"]):
        entry.unlink()  # its coefficient file was removed: learn again

    def run() -> dict[str, Any]:
        start = time.time()
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        if method == "adamerging":
            summary = _adamerging(zoo, seed, data, knobs, folder, device, progress)
        else:
            summary = _dam(zoo, seed, data, knobs, folder, device, progress)
        summary["seconds"] = round(time.time() - start, 1)
        return summary

    summary = cache.get_or_run(key, run)
    log(f"seed {seed}: {method:16s} learned in {summary['seconds']:.0f}s (cached after the first run); "
        f"objective {summary['objective_before']:.4g} -> {summary['objective_after']:.4g}")
    return summary["recipe"], {k: v for k, v in summary.items() if k != "recipe"}


def _still_there(summary: dict[str, Any]) -> bool:
    coefficients = (summary.get("recipe", {}).get("parameters") or {}).get("coefficients")
    return coefficients is None or Path(coefficients).is_file()


def _adamerging(zoo: Any, seed: int, data: list[str], knobs: dict[str, Any], folder: Path, device: str,
                progress: bool) -> dict[str, Any]:
    """Layer-wise AdaMerging of base + experts on the unlabeled validation prompts."""
    from mergesmith.learn.adamerging import AdaMergingSettings, adamerge

    recipe = {"merge_method": "task_arithmetic", "base_model": str(zoo.base), "dtype": "float32",
              "models": [{"model": str(zoo.experts[skill])} for skill in zoo.trained]}
    settings = AdaMergingSettings(granularity="layer", steps=knobs["steps"], lr=knobs["lr"],
                                  batch_size=knobs["batch_size"],
                                  samples=knobs["samples"], seed=seed, device=device, progress=progress)
    result = adamerge(recipe, data, folder / "learned.yml", settings, overwrite=True, plot=False)
    return {"recipe": result.recipe, "steps": len(result.losses), "objective_before": result.objective_before,
            "objective_after": result.objective_after, "settings": {k: v for k, v in asdict(settings).items()
                                                                    if k != "progress"}}


def _dam(zoo: Any, seed: int, data: list[str], knobs: dict[str, Any], folder: Path, device: str,
         progress: bool) -> dict[str, Any]:
    """DAM on the experts (no base model, DAM's default), each distilled on its own train prompts."""
    import yaml

    from mergesmith.learn.dam import DamSettings, run_dam

    recipe = {"merge_method": "linear", "models": [{"model": str(zoo.experts[skill])} for skill in zoo.trained]}
    experts = {str(zoo.experts[skill]): [f] for skill, f in zip(zoo.trained, data)}
    settings = DamSettings(samples=knobs["samples"], epochs=knobs["epochs"], max_length=knobs["max_length"],
                           seed=seed, include_answers=knobs.get("include_answers", False))
    result, recipe_path, _ = run_dam(recipe, experts, folder, settings, device=device, progress=progress,
                                     overwrite=True)
    return {"recipe": yaml.safe_load(recipe_path.read_text()), "steps": len(result.losses),
            "objective_before": result.objective_before, "objective_after": result.objective_after,
            "settings": asdict(settings)}
