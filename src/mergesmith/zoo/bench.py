"""``mergesmith bench``: merge the zoo's experts with every method and tabulate.

For each fine-tune seed: build (or reuse) the zoo, evaluate the base, every
expert (LoRA ones folded into the base) and the multitask model, then for every
method pick its hyperparameters on the validation split (multiple-choice
accuracy averaged over the trained skills; test data is never looked at), merge
the full experts with the chosen ones and evaluate on every test task, in
multiple-choice and generation form.

Outputs in ``--out``: ``table.md`` (both tables, mean ± spread over seeds, the
chosen hyperparameters, the timings), ``table.csv`` (multiple-choice accuracy),
``table_generation.csv`` (exact match), ``accuracy.png`` and ``results.json``
(every number per seed). Evaluations are cached under ``--out``/work, so an
interrupted run resumes where it stopped.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import statistics
import time
from dataclasses import dataclass, field, replace
from itertools import product
from pathlib import Path
from typing import Callable, Optional

from tqdm.auto import tqdm

from mergesmith.errors import InputError
from mergesmith.zoo.bench_learned import LEARNED_ROWS, calibration_block, learn_row

GEN_MAX_NEW_TOKENS = 16  # the longest answer (six spaced letters) is 12 tokens


def _grid(**axes: list) -> list[dict]:
    """Every combination of the axes, as recipe parameters."""
    keys = list(axes)
    return [dict(zip(keys, values)) for values in product(*(axes[k] for k in keys))]


# Validation grids. Each point holds the recipe's parameters; those the method declares
# per model (``density`` of the TIES family) are set for every expert. The first point of a grid
# wins ties. ``lambda`` scales the summed task vectors; for TIES-style methods
# (normalize: true) the sum is already a mean, hence the larger values. The
# ranges were widened once, when validation kept choosing their end points.
TA_LAMBDAS = [0.3, 0.5, 0.8, 1.0]
TIES_LAMBDAS = [0.7, 1.0, 1.5, 2.0]
# Widened once: validation chose the end point 1.0 of [0.3, 0.5, 0.8, 1.0] for tsv_m, iso_c, iso_cts
# and star, and 3.0 for cart, on the default zoo's seed 0.
SUBSPACE_LAMBDAS = [0.5, 1.0, 1.5, 2.0, 3.0]
# Iso-C/CTS flatten the spectrum of the summed task vectors to its mean singular value, which
# shrinks the dominant directions; validation then chose the end point 3.0 again: widened further.
ISO_LAMBDAS = [1.0, 2.0, 3.0, 4.0, 6.0, 8.0]
GRIDS: dict[str, list[dict]] = {
    "linear": [{}],
    "task_arithmetic": _grid(**{"lambda": TA_LAMBDAS}),
    "ties": _grid(density=[0.2, 0.5], **{"lambda": TIES_LAMBDAS}),
    "dare_ties": _grid(density=[0.2, 0.5], **{"lambda": TIES_LAMBDAS}),
    "dare_linear": _grid(density=[0.2, 0.5], **{"lambda": TA_LAMBDAS}),
    "breadcrumbs_ties": _grid(density=[0.2, 0.5], **{"lambda": TIES_LAMBDAS}),
    "della": _grid(density=[0.2, 0.5], **{"lambda": TIES_LAMBDAS}),
    "consensus_ties": _grid(density=[0.2, 0.5], **{"lambda": TIES_LAMBDAS}),
    "consensus_ta": _grid(**{"lambda": TA_LAMBDAS}),
    "model_stock": [{}],
    "sce": _grid(select_topk=[0.1, 0.5, 1.0]),
    "ram": [{}],
    "karcher": [{}],
    # Subspace methods (docs/methods/subspace.md, interference.md). Their merged task vector is
    # a sum over the experts (TSV-M, Iso-C/CTS, STAR's rescaled parts) or a mean (CART's
    # centre), so lambda spans both scales.
    "tsv_m": _grid(**{"lambda": SUBSPACE_LAMBDAS}),
    "iso_c": _grid(**{"lambda": ISO_LAMBDAS}),
    "iso_cts": _grid(common_space_fraction=[0.8], **{"lambda": ISO_LAMBDAS}),
    "star": _grid(eta=[40], **{"lambda": SUBSPACE_LAMBDAS}),
    "cart": _grid(rank_ratio=[0.12], **{"lambda": [1.0, 2.0, 3.0, 4.0, 6.0]}),
    "drm": _grid(stack=["vertical", "horizontal"], density=[0.2, 0.5]),
    "pcb": _grid(density=[0.1, 0.2, 0.5], **{"lambda": TA_LAMBDAS}),
    "wudi": [{}],
    # Data-aware rows (zoo/bench_learned.py): statistics on each expert's own train prompts, or
    # coefficients learned on train / unlabeled validation prompts. alpha: FusionBench's 0.95 and the
    # default 0.1 bracket it, and 1.0 (the Grams unshrunk, plain least squares) closes the range:
    # seed 0 chose 0.95, the top of the first grid. The Grams are computed once per expert and shared
    # by every point.
    "regmean": _grid(alpha=[0.1, 0.5, 0.95, 1.0]),
    "regmean_plusplus": _grid(alpha=[0.1, 0.5, 0.95, 1.0]),
    "fisher": [{}],
    "adamerging": [{}],  # learned: layer-wise weights from the entropy on validation prompts
    "dam": [{}],  # learned: per-column coefficients distilled from each expert on its train prompts
}
# 'all' is every training-free method, the table in docs/results.md; the data-aware rows need statistics or a
# learning step each (minutes per seed on two idle CPU cores) and are named by 'data-aware'.
DATA_AWARE_METHODS = ("regmean", "regmean_plusplus", "fisher", "adamerging", "dam")
ALL_METHODS = tuple(m for m in GRIDS if m not in DATA_AWARE_METHODS)
DEMO_METHODS = ("linear", "task_arithmetic", "ties", "dare_ties")


@dataclass
class SeedResult:
    """One fine-tune seed: scores[row][form][skill], chosen hyperparameters, timings."""

    seed: int
    zoo_root: str
    scores: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    chosen: dict[str, dict] = field(default_factory=dict)
    validation: dict[str, list] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    # route:* and moe:* rows: routing accuracy, held-out shares, cost, wall time against one model
    whole: dict[str, dict] = field(default_factory=dict)


# ----------------------------------------------------------------------------- merging


def recipe_for(zoo, method: str, point: dict, seed: int, skills: Optional[tuple[str, ...]] = None,
               calibration_answers: bool = False) -> dict:
    """A mergekit-style recipe merging the full experts of ``skills`` (default: every trained
    skill) of ``zoo`` with ``method``; a data-aware one calibrates on prompts and answers with
    ``calibration_answers``."""
    from mergesmith.methods import BasePolicy, get_method

    spec = get_method(method)
    per_model = {k: v for k, v in point.items() if spec.param(k) is not None and spec.param(k).per_model}
    params = {k: v for k, v in point.items() if k not in per_model}
    needs_weight = spec.param("weight") is not None
    models = []
    for skill in skills or zoo.trained:
        parameters = dict(per_model)
        if needs_weight:
            parameters["weight"] = 1.0
        models.append({"model": str(zoo.experts[skill]), "parameters": parameters})
    recipe = {"merge_method": method, "models": models, "dtype": "float32", "random_seed": seed}
    if spec.base != BasePolicy.IGNORED:
        recipe["base_model"] = str(zoo.base)
    if params:
        recipe["parameters"] = params
    if spec.needs_stats:  # each expert's statistics on its own skill's train data
        calibration_block(zoo, recipe, include_answers=calibration_answers)
    return recipe


def merge_into(recipe: dict, out_dir: Path, device: str) -> float:
    from mergesmith import merge

    start = time.time()
    if out_dir.exists():
        shutil.rmtree(out_dir)
    merge(recipe, out_dir, device=device, progress=False, overwrite=True)
    return time.time() - start


# ----------------------------------------------------------------------------- evaluation


def load_task_set(files: list[Path], form: str, limit: Optional[int]):
    """Tasks named by skill; generation capped at a few tokens (answers are short)."""
    from mergesmith.evaluate import load_tasks

    tasks = load_tasks(files, limit=limit)
    if form == "gen":
        for task in tasks:
            task.settings = replace(task.settings, max_new_tokens=GEN_MAX_NEW_TOKENS)
    return tasks


def score(model: Path, tasks, device: str, batch_size: int) -> dict[str, float]:
    """Headline score per task: accuracy (multiple choice) or exact match (generation)."""
    return timed_score(model, tasks, device, batch_size)["scores"]


def timed_score(model: Path, tasks, device: str, batch_size: int) -> dict:
    """``score``'s scores, the evaluation's wall seconds and, for a routed model folder, its routing
    report (which expert answered each task's items: ``share_by_task``)."""
    from mergesmith.evaluate import evaluate

    start = time.monotonic()
    result = evaluate(str(model), tasks, batch_size=batch_size, device=device, progress=False,
                      bootstrap=0)
    return {"scores": {t.name: float(t.score) for t in result.tasks}, "seconds": time.monotonic() - start,
            "routed": result.settings.get("routed")}


def task_set_key(tasks) -> str:
    """What a cached score was computed on: every item and setting of the tasks. A changed task
    file (new held-out items, another limit) must not reuse the scores of the old one."""
    h = hashlib.sha256()
    for task in tasks:
        h.update(repr((task.name, task.settings, task.items)).encode())
    return h.hexdigest()[:16]


class EvalCache:
    """Scores keyed by model folder and task set, so a rerun skips finished work."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.folder / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"

    def get_or_run(self, key: str, run: Callable[[], dict]) -> dict:
        path = self._path(key)
        if path.exists():
            return json.loads(path.read_text())["value"]
        value = run()
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": key, "value": value}))
        tmp.replace(path)
        return value


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


# ----------------------------------------------------------------------------- the run


@dataclass
class BenchConfig:
    out: Path
    size: str = "default"
    zoo_seed: int = 0
    seeds: tuple[int, ...] = (0,)
    methods: tuple[str, ...] = ALL_METHODS
    cache: Optional[Path] = None
    device: str = "cpu"
    limit: Optional[int] = None  # test items per task (None: all)
    val_limit: Optional[int] = None  # validation items per task (None: all)
    batch_size: int = 32
    generation: bool = True
    progress: bool = True
    command: str = ""
    # data-aware rows (regmean, regmean_plusplus, fisher, dam) calibrate on train prompts followed by
    # their answers, not prompts alone (calibration.include_answers); adamerging stays prompt-only
    calibration_answers: bool = False
    routers: tuple[str, ...] = ()  # route:<kind> rows (zoo/bench_route.py)
    # Rows that modules above this one add (zoo/bench_lora.py: ``LoraRows``, ``--lora``; zoo/bench_vocab.py:
    # ``VocabRows``, ``--vocab``): each source has ``rows(cfg, zoo, seed, val, cache, work, result, log)``,
    # yielding ``ExtraRow``s (row name, evaluation cache key, a function that writes the row's model into a
    # folder and returns it), and ``section(results, trained, heldout, generation)``, its lines of table.md.
    extra_rows: tuple = ()
    moe: tuple[str, ...] = ()  # moe:<kind> rows (zoo/bench_moe.py)


# One row an ``extra_rows`` source yields: table name, evaluation cache key, writes the model into a folder.
ExtraRow = tuple[str, str, Callable[[Path], Path]]


def method_problems(methods: tuple[str, ...]) -> list[str]:
    """Every ``--methods`` name must be a registered merge method with a validation grid here."""
    from mergesmith.methods import all_methods

    known = [*all_methods(), *LEARNED_ROWS]  # adamerging is a learning step, not a merge method
    problems = []
    if not methods:
        problems.append("--methods: name at least one method")
    for m in methods:
        if m not in known:
            problems.append(f"--methods: {m!r} is not a merge method; choose from {', '.join(GRIDS)}")
        elif m not in GRIDS:
            problems.append(f"--methods: {m!r} is a merge method, but the benchmark has no validation grid for "
                            f"it; choose from {', '.join(GRIDS)}")
    repeated = sorted({m for m in methods if methods.count(m) > 1})
    if repeated:
        problems.append(f"--methods: {', '.join(repeated)} named more than once; name each method once")
    return problems


def check_methods(methods: tuple[str, ...]) -> None:
    problems = method_problems(methods)
    if problems:
        raise InputError(problems)


def config_problems(cfg: BenchConfig) -> list[str]:
    """Every problem with a benchmark configuration, found before the zoo is built or a model loaded."""
    from mergesmith.checks import at_least, output_dir_problems
    from mergesmith.extras import extra_problems
    from mergesmith.zoo.build import build_problems

    problems = method_problems(tuple(cfg.methods))
    seeds = tuple(cfg.seeds)
    if not seeds:
        problems.append("--seeds: give at least one fine-tune seed")
    for seed in seeds:
        problems += at_least("--seeds", seed, 0, "fine-tune seeds")
    repeated = sorted({s for s in seeds if seeds.count(s) > 1}, key=str)
    if repeated:
        problems.append(f"--seeds: {', '.join(map(str, repeated))} given more than once; a repeated seed "
                        "would count the same run twice in the spread")
    problems += at_least("--limit", cfg.limit, 1, "test items per task; leave it out for all", optional=True)
    problems += at_least("--val-limit", cfg.val_limit, 1, "validation items per task; leave it out for all",
                         optional=True)
    problems += at_least("--batch-size", cfg.batch_size, 1, "items per forward pass")
    problems += build_problems(cfg.size, cfg.zoo_seed, cfg.cache, device=cfg.device)
    problems += output_dir_problems(cfg.out)
    problems += extra_problems("mergesmith bench", "zoo")
    return list(dict.fromkeys(problems))


def run_seed(cfg: BenchConfig, seed: int, work: Path, log: Callable[[str], None]) -> SeedResult:
    from mergesmith.zoo.build import build_zoo

    start = time.time()
    zoo = build_zoo(cfg.size, cfg.zoo_seed, cfg.cache, finetune_seed=seed, device=cfg.device,
                    progress=cfg.progress)
    result = SeedResult(seed=seed, zoo_root=str(zoo.root))
    result.seconds["zoo"] = round(time.time() - start, 1)
    log(f"seed {seed}: zoo ready at {zoo.root} ({result.seconds['zoo']:.0f}s)")
    cache = EvalCache(work / "evals")
    test = {"mc": load_task_set(zoo.task_files("test", "mc"), "mc", cfg.limit)}
    if cfg.generation:
        test["gen"] = load_task_set(zoo.task_files("test", "gen"), "gen", cfg.limit)
    val = load_task_set(zoo.task_files("validation", "mc", list(zoo.trained)), "mc", cfg.val_limit)
    limits = f"limit={cfg.limit}|" + "|".join(f"{form}={task_set_key(tasks)}" for form, tasks in test.items())
    eval_seconds = 0.0

    def evaluate_row(name: str, path: Path, key: str) -> None:
        nonlocal eval_seconds
        t0 = time.time()
        result.scores[name] = {
            form: cache.get_or_run(f"{key}|test|{form}|{limits}",
                                   lambda tasks=tasks: score(path, tasks, cfg.device, cfg.batch_size))
            for form, tasks in test.items()}
        eval_seconds += time.time() - t0

    def scored(key: str) -> bool:
        return all(cache._path(f"{key}|test|{form}|{limits}").exists() for form in test)

    rows = list(zoo.models().items())
    for name, path in tqdm(rows, desc=f"seed {seed}: zoo models", disable=not cfg.progress):
        evaluate_row(name, path, str(path))
    for name, path in zoo.distractors.items():  # the pool's distractors: evaluated, never merged here
        evaluate_row(f"distractor:{name}", path, str(path))
    for skill, adapter in zoo.lora.items():  # row lora:<skill>: the adapter folded into the base
        key, folder = f"{adapter}|lora", work / "lora" / f"seed{seed}" / skill
        if not scored(key):
            from mergesmith.zoo.lora import materialize_lora

            shutil.rmtree(folder, ignore_errors=True)
            materialize_lora(adapter, zoo.base, folder)
        evaluate_row(f"lora:{skill}", folder, key)
        shutil.rmtree(folder, ignore_errors=True)
    merge_seconds = select_seconds = 0.0
    merges = work / "merges" / f"seed{seed}"
    for method in cfg.methods:
        t0 = time.time()
        if method in LEARNED_ROWS:  # its recipe is learned (and cached), not chosen from a grid
            recipe, learned = learn_row(zoo, method, seed, cache=cache, work=work, device=cfg.device,
                                        val_limit=cfg.val_limit, progress=cfg.progress, log=log,
                                        include_answers=cfg.calibration_answers)
            best, trials = {}, [learned]
        else:
            best, trials = select(cfg, zoo, method, seed, val, cache, merges, log)
            recipe = recipe_for(zoo, method, best, seed, calibration_answers=cfg.calibration_answers)
        select_seconds += time.time() - t0
        key = f"{zoo.root}|{json.dumps(recipe, sort_keys=True)}"
        out_dir = merges / method
        if not scored(key):
            merge_seconds += merge_into(recipe, out_dir, cfg.device)
        evaluate_row(f"merge:{method}", out_dir, key)
        shutil.rmtree(out_dir, ignore_errors=True)
        result.chosen[method] = best
        result.validation[method] = trials
        avg = mean(result.scores[f"merge:{method}"]["mc"][s] for s in zoo.trained)
        log(f"seed {seed}: {method:16s} chose {best or '-'}; test avg over trained skills "
            f"{avg:.3f} ({time.time() - t0:.0f}s)")
    if cfg.routers or cfg.moe:  # experts kept whole (docs/route.md, docs/moe.md)
        t0 = time.time()
        result.whole = whole_rows(cfg, zoo, seed, work, cache, test, limits, val, merges, result, log)
        for name in result.whole:
            result.scores[name] = {form: scores for form, scores in result.whole[name].pop("scores").items()}
        eval_seconds += time.time() - t0
    for source in cfg.extra_rows:  # e.g. the LoRA rows (zoo/bench_lora.py)
        for name, key, make in source.rows(cfg, zoo, seed, val, cache, work, result, log):
            folder = work / "extra-rows" / f"seed{seed}" / name.replace(":", "-")
            evaluate_row(name, folder if scored(key) else make(folder), key)
            shutil.rmtree(folder, ignore_errors=True)
    result.seconds["evaluate"] = round(eval_seconds, 1)
    result.seconds["merge"] = round(merge_seconds, 1)
    result.seconds["select"] = round(select_seconds, 1)
    result.seconds["total"] = round(time.time() - start, 1)
    return result


def whole_rows(cfg: BenchConfig, zoo, seed: int, work: Path, cache: EvalCache, test: dict, limits: str, val,
               merges: Path, result: SeedResult, log: Callable[[str], None]) -> dict[str, dict]:
    """The route:<kind> and moe:<kind> rows: their scores (``scores``) and what else each reports.

    Their evaluations are cached with their wall seconds (and the routing report of a routed
    folder), so ``wall_x``, the row's evaluation time over the base's on the same test tasks, is
    the ratio of two measured runs, whenever they ran."""
    from mergesmith.zoo.bench_moe import run_moe_rows
    from mergesmith.zoo.bench_route import run_route_rows

    def timed(path: Path, key: str) -> dict:
        return {form: cache.get_or_run(f"{key}|test|{form}|{limits}|timed",
                                       lambda tasks=tasks: timed_score(path, tasks, cfg.device, cfg.batch_size))
                for form, tasks in test.items()}

    def scored(key: str) -> bool:
        return all(cache._path(f"{key}|test|{form}|{limits}|timed").exists() for form in test)

    one_model = sum(v["seconds"] for v in timed(zoo.base, f"{zoo.base}|one-model").values())
    rows = run_route_rows(cfg.routers, zoo, seed, work, cfg.device, cache, timed, scored,
                          val_heldout=lambda: heldout_validation(cfg, zoo, cache), log=log)

    def ties_point() -> dict:  # the point the ties row chose on validation (cached: no work twice)
        return select(cfg, zoo, "ties", seed, val, cache, merges, log)[0]

    rows.update(run_moe_rows(cfg.moe, zoo, seed, work, cfg.device, cache, timed, scored, ties_point, log))
    for row in rows.values():
        row["wall_x"] = row["eval_seconds"] / one_model if one_model > 0 else float("nan")
    return rows


def heldout_validation(cfg: BenchConfig, zoo, cache: EvalCache) -> dict[str, dict[str, float]]:
    """Every expert's validation accuracy (multiple choice) on each held-out skill: the oracle's
    choice for a skill no expert was trained on (zoo/bench_route.py)."""
    tasks = load_task_set(zoo.task_files("validation", "mc", list(zoo.heldout)), "mc", cfg.val_limit)
    key = task_set_key(tasks)
    return {skill: cache.get_or_run(f"{path}|validation-heldout|limit={cfg.val_limit}|{key}",
                                    lambda path=path: score(path, tasks, cfg.device, cfg.batch_size))
            for skill, path in zoo.experts.items() if skill in zoo.trained}


def select(cfg: BenchConfig, zoo, method: str, seed: int, val, cache: EvalCache, merges: Path,
           log: Callable[[str], None], skills: Optional[tuple[str, ...]] = None) -> tuple[dict, list]:
    """The grid point with the best validation accuracy over ``val`` (the merged skills' tasks)."""
    grid = GRIDS[method]
    if len(grid) == 1:
        return grid[0], []
    trials = []
    val_key = task_set_key(val)
    for i, point in enumerate(grid):
        recipe = recipe_for(zoo, method, point, seed, skills, calibration_answers=cfg.calibration_answers)
        key = (f"{zoo.root}|{json.dumps(recipe, sort_keys=True)}|validation|limit={cfg.val_limit}"
               f"|{val_key}")

        def run(recipe=recipe, i=i) -> dict:
            out_dir = merges / f"{method}-val{i}"
            merge_into(recipe, out_dir, cfg.device)
            try:
                return score(out_dir, val, cfg.device, cfg.batch_size)
            finally:
                shutil.rmtree(out_dir, ignore_errors=True)

        scores = cache.get_or_run(key, run)
        trials.append({"params": point, "validation": round(mean(scores.values()), 4)})
    best = max(range(len(trials)), key=lambda i: (trials[i]["validation"], -i))
    return grid[best], trials


# ----------------------------------------------------------------------------- tables


def row_order(names: list[str]) -> list[str]:
    def rank(name: str) -> tuple:
        kind = name.split(":")[0]
        order = {"base": 0, "expert": 1, "lora": 2, "distractor": 3, "multitask": 4, "merge": 5, "route": 6,
                 "moe": 7}
        return (order.get(kind, len(order)),)  # extra rows (cfg.extra_rows) last, in the order they came
    return sorted(names, key=rank)  # stable: experts and merges keep their order


def summarize(results: list[SeedResult], trained: tuple[str, ...],
              heldout: tuple[str, ...], form: str) -> dict[str, dict]:
    """Per row: mean and spread over seeds of every skill and of the averages."""
    rows = {}
    names = row_order(list(results[0].scores))
    for name in names:
        per_seed = []
        for r in results:
            s = r.scores[name][form]
            values = dict(s)
            values["avg_trained"] = mean(s[k] for k in trained)
            values["avg_heldout"] = mean(s[k] for k in heldout)
            own = {k: r.scores[f"expert:{k}"][form][k] for k in trained}
            values["normalized"] = mean(s[k] / own[k] for k in trained if own[k] > 0)
            per_seed.append(values)
        keys = list(per_seed[0])
        rows[name] = {k: (mean(v[k] for v in per_seed),
                          statistics.stdev([v[k] for v in per_seed]) if len(per_seed) > 1 else 0.0)
                      for k in keys}
    return rows


def write_csv(path: Path, rows: dict[str, dict], skills: tuple[str, ...]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", *skills, "avg_trained", "avg_heldout"])
        for name, values in rows.items():
            writer.writerow([name] + [f"{values[k][0]:.4f}" for k in (*skills, "avg_trained",
                                                                       "avg_heldout")])


def markdown_table(rows: dict[str, dict], skills: tuple[str, ...], spread: bool) -> str:
    cols = [*skills, "avg_trained", "avg_heldout", "normalized"]
    lines = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, values in rows.items():
        cells = []
        for c in cols:
            m, s = values[c]
            show_spread = spread and c in ("avg_trained", "avg_heldout", "normalized")
            cells.append(f"{m:.3f} ± {s:.3f}" if show_spread else f"{m:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(path: Path, rows: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(names) + 1.5))
    y = list(range(len(names)))
    for offset, key, label in ((-0.2, "avg_trained", "trained skills"),
                               (0.2, "avg_heldout", "held-out skills")):
        ax.barh([i + offset for i in y], [rows[n][key][0] for n in names], height=0.38,
                xerr=[rows[n][key][1] for n in names], label=label, capsize=2)
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlabel("multiple-choice accuracy (test), mean over seeds")
    ax.set_xlim(0, 1)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def whole_section(results: list[SeedResult], mc: dict, gen: Optional[dict], heldout: tuple[str, ...],
                  spread: bool) -> list[str]:
    """The route:* and moe:* rows beside the best merge: accuracy, routing, cost, wall time."""
    def cell(values: list[float]) -> str:
        values = [v for v in values if v is not None]
        if not values:
            return "-"
        m = mean(values)
        return f"{m:.3f} ± {statistics.stdev(values):.3f}" if spread and len(values) > 1 else f"{m:.3f}"

    def pair(table: Optional[dict], name: str, key: str) -> str:
        if table is None or name not in table:
            return "-"
        m, sd = table[name][key]
        return f"{m:.3f} ± {sd:.3f}" if spread else f"{m:.3f}"

    merges = [n for n in mc if n.startswith("merge:")]
    best = max(merges, key=lambda n: mc[n]["avg_trained"][0]) if merges else None
    names = ([best] if best else []) + ["multitask", *results[0].whole]
    lines = ["", "## Experts kept whole: routed models and mixtures of experts", "",
             "Routing accuracy: the share of a trained skill's test items (route) or test tokens, "
             "top-1, mean over layers (moe) sent to that skill's expert, mean over the trained skills. "
             "params_x and active_x: parameters, and parameters active per token, over the base's. "
             "wall_x: the row's test evaluation time over the base's (same tasks, this machine). "
             "route:oracle is an upper bound, not a router (held-out skills: the best expert on validation).",
             "", "| row | avg_trained | avg_heldout | gen avg_trained | gen avg_heldout | routing accuracy | "
             "params_x | active_x | wall_x |", "|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        w = [r.whole.get(name, {}) for r in results]
        lines.append(f"| {name} | {pair(mc, name, 'avg_trained')} | {pair(mc, name, 'avg_heldout')} | "
                     f"{pair(gen, name, 'avg_trained')} | {pair(gen, name, 'avg_heldout')} | "
                     f"{cell([x.get('routing_accuracy') for x in w])} | {cell([x.get('params_x') for x in w])} | "
                     f"{cell([x.get('active_params_x') for x in w])} | {cell([x.get('wall_x') for x in w])} |")
    routed = [n for n in results[0].whole if "heldout_shares" in results[0].whole[n]]
    if routed and heldout:
        lines += ["", "Held-out skills: where the routers send them (share of test items, mean over seeds; "
                      "experts with at least 0.10)", "", "| row | " + " | ".join(heldout) + " |",
                  "|---" * (len(heldout) + 1) + "|"]
        for name in routed:
            cells = []
            for h in heldout:
                shares: dict[str, float] = {}
                for r in results:
                    for expert, v in r.whole[name]["heldout_shares"].get(h, {}).items():
                        shares[expert] = shares.get(expert, 0.0) + v / len(results)
                top = sorted(shares.items(), key=lambda kv: -kv[1])
                cells.append(", ".join(f"{e} {v:.2f}" for e, v in top if v >= 0.1) or "-")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def write_outputs(cfg: BenchConfig, results: list[SeedResult], trained: tuple[str, ...],
                  heldout: tuple[str, ...], seconds: dict) -> str:
    skills = (*trained, *heldout)
    out = cfg.out
    mc = summarize(results, trained, heldout, "mc")
    write_csv(out / "table.csv", mc, skills)
    plot(out / "accuracy.png", mc)
    spread = len(results) > 1
    seeds = ", ".join(str(r.seed) for r in results)
    parts = [
        "# mergesmith bench",
        "",
        f"Command: `{cfg.command}`" if cfg.command else "",
        f"Zoo: size `{cfg.size}`, world seed {cfg.zoo_seed}, fine-tune seeds {seeds}. "
        f"Test items per task: {cfg.limit or 'all'}. Hyperparameters chosen on the validation "
        "split (multiple-choice accuracy over the trained skills)."
        + (" Data-aware rows calibrated on each expert's train prompts followed by their answers "
           "(`--calibration-answers`; adamerging on unlabeled prompts)." if cfg.calibration_answers else ""),
        "Cells are means over seeds" + (" (± standard deviation)" if spread else "") +
        "; `normalized` is accuracy divided by the expert's own accuracy, averaged over the "
        "trained skills. Chance: 0.25 with four choices, 0.5 for yes/no and up/down.",
        "",
        "## Multiple-choice accuracy (test)",
        "",
        markdown_table(mc, skills, spread),
    ]
    if cfg.generation:
        gen = summarize(results, trained, heldout, "gen")
        write_csv(out / "table_generation.csv", gen, skills)
        parts += ["", "## Greedy generation, exact match (test)", "",
                  markdown_table(gen, skills, spread)]
    parts += ["", "## Ranking of merge methods (multiple choice, trained skills)", ""]
    merges = sorted((n for n in mc if n.startswith("merge:")), key=lambda n: -mc[n]["avg_trained"][0])
    best_expert = max((n for n in mc if n.startswith(("expert:", "lora:"))),
                      key=lambda n: mc[n]["avg_trained"][0])
    multi, base = mc["multitask"], mc["base"]
    for i, name in enumerate(merges, 1):
        m, s = mc[name]["avg_trained"]
        parts.append(f"{i}. {name[6:]}: {m:.3f}" + (f" ± {s:.3f}" if spread else ""))
    if merges:
        top = mc[merges[0]]["avg_trained"][0]
        best_heldout = max(merges, key=lambda n: mc[n]["avg_heldout"][0])
        top_heldout = mc[best_heldout]["avg_heldout"][0]
        parts += ["", f"Best merge on the trained skills {merges[0][6:]} {top:.3f}; best single expert "
                      f"({best_expert}) {mc[best_expert]['avg_trained'][0]:.3f}; multitask "
                      f"{multi['avg_trained'][0]:.3f}; gap to multitask {multi['avg_trained'][0] - top:.3f}.",
                  f"Best merge on the held-out skills {best_heldout[6:]} {top_heldout:.3f}; multitask "
                  f"{multi['avg_heldout'][0]:.3f}, base {base['avg_heldout'][0]:.3f}; gap to multitask "
                  f"{multi['avg_heldout'][0] - top_heldout:.3f}, gain over the base "
                  f"{top_heldout - base['avg_heldout'][0]:.3f}."]
    if results[0].whole:
        parts += whole_section(results, mc, gen if cfg.generation else None, heldout, spread)
    if heldout:
        parts += ["", "## Held-out skills: multitask against base (multiple choice, per seed)", "",
                  "| skill | " + " | ".join(f"seed {r.seed}" for r in results) + " | min |",
                  "|---" * (len(results) + 2) + "|"]
        for skill in heldout:
            gains = [r.scores["multitask"]["mc"][skill] - r.scores["base"]["mc"][skill] for r in results]
            parts.append(f"| {skill} | " + " | ".join(f"{g:+.3f}" for g in gains) + f" | {min(gains):+.3f} |")
    for source in cfg.extra_rows:
        parts += source.section(results, trained, heldout, cfg.generation)
    parts += ["", "## Chosen hyperparameters", "", "| method | " +
              " | ".join(f"seed {r.seed}" for r in results) + " |",
              "|---" * (len(results) + 1) + "|"]
    for method in [*cfg.methods, *(k for k in results[0].chosen if k not in cfg.methods)]:  # then LoRA rows
        cells = [json.dumps(r.chosen.get(method, {})) for r in results]
        parts.append(f"| {method} | " + " | ".join(cells) + " |")
    parts += ["", "## Timings (seconds, this run; cached work counts as zero)", "",
              "| seed | zoo build | validation search (merges + evaluation) | final merges "
              "| test evaluation | total |", "|---|---|---|---|---|---|"]
    for r in results:
        s = r.seconds
        parts.append(f"| {r.seed} | {s['zoo']:.0f} | {s['select']:.0f} | {s['merge']:.0f} | "
                     f"{s['evaluate']:.0f} | {s['total']:.0f} |")
    parts.append(f"\nWhole run: {seconds['total']:.0f}s.")
    text = "\n".join(p for p in parts if p is not None) + "\n"
    (out / "table.md").write_text(text)
    (out / "results.json").write_text(json.dumps({
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in cfg.__dict__.items()},
        "trained": trained, "heldout": heldout, "seconds": seconds,
        "seeds": [r.__dict__ for r in results]}, indent=1, default=str))
    return text


def run_bench(cfg: BenchConfig, log: Callable[[str], None] = print) -> str:
    """Run the benchmark; returns the markdown table (also written to ``cfg.out``)."""
    from mergesmith.checks import prepare_output_dir, resolve_device
    from mergesmith.zoo.build import Zoo
    from mergesmith.paths import OutputLock

    problems = config_problems(cfg)
    if problems:
        raise InputError(problems)
    cfg.device = resolve_device(cfg.device)
    with OutputLock(cfg.out):  # one bench per output folder: a second one stops here, at once
        prepare_output_dir(cfg.out)
        start = time.time()
        results = []
        for seed in cfg.seeds:
            work = cfg.out / "work" / f"{cfg.size}-s{cfg.zoo_seed}"
            results.append(run_seed(cfg, seed, work, log))
        seconds = {"total": round(time.time() - start, 1)}
        # the skills of the zoo that was evaluated (its manifest), not of this version of skills.py
        zoo = Zoo.load(Path(results[0].zoo_root))
        return write_outputs(cfg, results, zoo.trained, zoo.heldout, seconds)


# ----------------------------------------------------------------------------- method names


def parse_methods(text: str) -> tuple[str, ...]:
    """'all', 'demo' or comma-separated names (checked by ``method_problems``)."""
    if text == "all":
        return ALL_METHODS
    if text == "demo":
        return DEMO_METHODS
    if text == "data-aware":
        return DATA_AWARE_METHODS
    if text == "everything":
        return ALL_METHODS + DATA_AWARE_METHODS
    return tuple(m.strip() for m in text.split(",") if m.strip())
