"""``mergesmith bench --study scaling``: a miniature of "What Matters for Model Merging at Scale?"
(Yadav et al., 2024).

The paper merges 2 to 8 experts of PaLM-2 bases from 1B to 64B parameters and reports that
(1) larger and stronger bases merge better, (2) merging more experts improves held-out
generalization, and (3) the differences between merging methods shrink as the base grows.

Here, for each zoo size (``--sizes``, default ``test,default,medium``), each number of experts
k (``--expert-counts``, default 2, 4, 8) and each method (default linear, task arithmetic,
TIES):

* the k experts are drawn from the eight trained skills (``--subsets`` seeded draws for k < 8,
  the same draws for every method and size; k = 8 is the one full set);
* hyperparameters are chosen on the validation split of the k merged skills, from the
  benchmark's grids (test is never looked at);
* **normalized held-in accuracy** is the merge's multiple-choice accuracy on each merged skill
  divided by that skill's expert's, averaged over the k skills (the paper's normalization);
* **held-out gain** is the merge's average accuracy on the zoo's held-out skills minus the
  base's.

Outputs in ``--out``: ``scaling.csv`` (one row per size, k, draw and method), ``heldin.png`` and
``heldout.png`` (one curve per method, one panel per size, mean over the draws), ``study.md``
and ``results.json``. Scores are cached under ``--out``/work like the benchmark's.
"""

from __future__ import annotations

import csv
import json
import random
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from tqdm.auto import tqdm

from mergesmith.errors import InputError

STUDY_METHODS = ("linear", "task_arithmetic", "ties")
STUDY_SIZES = ("test", "default", "medium")
EXPERT_COUNTS = (2, 4, 8)


@dataclass
class StudyConfig:
    out: Path
    sizes: tuple[str, ...] = STUDY_SIZES
    counts: tuple[int, ...] = EXPERT_COUNTS
    methods: tuple[str, ...] = STUDY_METHODS
    subsets: int = 2  # draws of k experts for each k below the full set
    zoo_seed: int = 0
    seed: int = 0  # the fine-tune seed
    cache: Optional[Path] = None
    device: str = "cpu"
    limit: Optional[int] = None
    val_limit: Optional[int] = None
    batch_size: int = 32
    progress: bool = True
    command: str = ""


def draws(trained: tuple[str, ...], k: int, n: int, seed: int) -> list[tuple[str, ...]]:
    """``n`` distinct seeded subsets of ``k`` skills (the one full set when k is all of them)."""
    if k >= len(trained):
        return [tuple(trained)]
    rng = random.Random(f"scaling-{k}-{seed}")
    out: list[tuple[str, ...]] = []
    while len(out) < n:
        pick = tuple(sorted(rng.sample(trained, k), key=trained.index))
        if pick not in out:
            out.append(pick)
    return out


def study_problems(cfg: StudyConfig) -> list[str]:
    from mergesmith.checks import at_least, output_dir_problems
    from mergesmith.extras import extra_problems
    from mergesmith.zoo import skills as S
    from mergesmith.zoo.bench import method_problems
    from mergesmith.zoo.build import build_problems

    problems = method_problems(tuple(cfg.methods))
    if not cfg.sizes:
        problems.append("--sizes: name at least one zoo size")
    for size in cfg.sizes:
        problems += build_problems(size, cfg.zoo_seed, cfg.cache, finetune_seed=cfg.seed, device=cfg.device)
    if not cfg.counts:
        problems.append("--expert-counts: give at least one number of experts")
    for k in cfg.counts:
        if not isinstance(k, int) or not 2 <= k <= len(S.TRAINED):
            problems.append(f"--expert-counts: {k!r} is not between 2 and {len(S.TRAINED)} (the trained skills)")
    problems += at_least("--subsets", cfg.subsets, 1, "draws of k experts for each k")
    problems += at_least("--limit", cfg.limit, 1, "test items per task; leave it out for all", optional=True)
    problems += at_least("--val-limit", cfg.val_limit, 1, "validation items per task", optional=True)
    problems += at_least("--batch-size", cfg.batch_size, 1, "items per forward pass")
    problems += output_dir_problems(cfg.out)
    problems += extra_problems("mergesmith bench --study scaling", "zoo")
    return list(dict.fromkeys(problems))


def run_size(cfg: StudyConfig, size: str, log: Callable[[str], None]) -> list[dict]:
    """Every (k, draw, method) row of one zoo size."""
    from mergesmith.zoo import bench as BN
    from mergesmith.zoo.build import build_zoo

    zoo = build_zoo(size, cfg.zoo_seed, cfg.cache, finetune_seed=cfg.seed, device=cfg.device,
                    progress=cfg.progress)
    params = zoo.manifest.get("training", {}).get("base", {}).get("parameters")
    work = cfg.out / "work" / f"{size}-s{cfg.zoo_seed}"
    cache = BN.EvalCache(work / "evals")
    test = BN.load_task_set(zoo.task_files("test", "mc"), "mc", cfg.limit)
    test_key = f"test|mc|{BN.task_set_key(test)}"

    def scores(key: str, path: Path) -> dict[str, float]:
        return cache.get_or_run(f"{key}|{test_key}", lambda: BN.score(path, test, cfg.device, cfg.batch_size))

    base = scores(str(zoo.base), zoo.base)
    experts = {s: scores(str(p), p)[s] for s, p in zoo.experts.items()}
    base_heldout = BN.mean(base[s] for s in zoo.heldout)
    bench_cfg = BN.BenchConfig(out=cfg.out, size=size, device=cfg.device, val_limit=cfg.val_limit,
                               batch_size=cfg.batch_size, progress=False)
    merges = work / "merges"
    rows = []
    plan = [(k, i, subset) for k in cfg.counts
            for i, subset in enumerate(draws(zoo.trained, k, cfg.subsets, cfg.seed))]
    for k, i, subset in tqdm(plan, desc=f"{size}: expert sets", disable=not cfg.progress):
        val = BN.load_task_set(zoo.task_files("validation", "mc", list(subset)), "mc", cfg.val_limit)
        for method in cfg.methods:
            t0 = time.time()
            point, _ = BN.select(bench_cfg, zoo, method, cfg.seed, val, cache, merges, log, subset)
            recipe = BN.recipe_for(zoo, method, point, cfg.seed, subset)
            out_dir = merges / f"{method}-k{k}-{i}"
            key = f"{zoo.root}|{json.dumps(recipe, sort_keys=True)}"

            def merged(recipe=recipe, out_dir=out_dir) -> dict:
                BN.merge_into(recipe, out_dir, cfg.device)
                try:
                    return BN.score(out_dir, test, cfg.device, cfg.batch_size)
                finally:
                    shutil.rmtree(out_dir, ignore_errors=True)

            acc = cache.get_or_run(f"{key}|{test_key}", merged)
            heldin = BN.mean(acc[s] for s in subset)
            heldout = BN.mean(acc[s] for s in zoo.heldout)
            rows.append({
                "size": size, "parameters": params, "k": k, "draw": i, "experts": "+".join(subset),
                "method": method, "chosen": json.dumps(point, sort_keys=True),
                "normalized_heldin": round(BN.mean(acc[s] / experts[s] for s in subset if experts[s] > 0), 4),
                "avg_heldin": round(heldin, 4), "avg_heldout": round(heldout, 4),
                "heldout_gain": round(heldout - base_heldout, 4),
                "base_heldout": round(base_heldout, 4), "seconds": round(time.time() - t0, 1)})
            log(f"{size} k={k} draw {i} {method:16s} normalized held-in {rows[-1]['normalized_heldin']:.3f}, "
                f"held-out gain {rows[-1]['heldout_gain']:+.3f}")
    return rows


def curves(rows: list[dict], metric: str) -> dict[tuple[str, str], dict[int, tuple[float, float]]]:
    """(size, method) -> k -> (mean, spread over draws) of ``metric``."""
    out: dict[tuple[str, str], dict[int, list[float]]] = {}
    for r in rows:
        out.setdefault((r["size"], r["method"]), {}).setdefault(r["k"], []).append(r[metric])
    return {key: {k: (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0)
                  for k, v in sorted(by_k.items())} for key, by_k in out.items()}


def plot(path: Path, rows: list[dict], metric: str, label: str, sizes: tuple[str, ...]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = curves(rows, metric)
    fig, axes = plt.subplots(1, len(sizes), figsize=(4.2 * len(sizes), 3.6), sharey=True, squeeze=False)
    for ax, size in zip(axes[0], sizes):
        for (s, method), by_k in data.items():
            if s != size:
                continue
            ks = list(by_k)
            ax.errorbar(ks, [by_k[k][0] for k in ks], yerr=[by_k[k][1] for k in ks], marker="o",
                        capsize=3, label=method)
        params = next((r["parameters"] for r in rows if r["size"] == size and r["parameters"]), None)
        ax.set_title(size + (f" ({params / 1e6:.1f}M params)" if params else ""))
        ax.set_xlabel("experts merged")
        ax.set_xticks(sorted({r["k"] for r in rows}))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(label)
    axes[0][-1].legend(loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(cfg: StudyConfig, rows: list[dict], seconds: float) -> str:
    heldin, heldout = curves(rows, "normalized_heldin"), curves(rows, "heldout_gain")
    ks = sorted({r["k"] for r in rows})
    lines = ["# mergesmith bench --study scaling", "",
             f"Command: `{cfg.command}`" if cfg.command else "",
             f"World seed {cfg.zoo_seed}, fine-tune seed {cfg.seed}; for k below eight, {cfg.subsets} "
             "seeded draws of k experts (mean ± standard deviation over the draws). Hyperparameters "
             "chosen on the merged skills' validation split. Normalized held-in: accuracy on each "
             "merged skill over its expert's, averaged; held-out gain: average accuracy on the "
             "held-out skills minus the base's (multiple choice, test).", "",
             "| size | method | " + " | ".join(f"held-in k={k}" for k in ks) + " | "
             + " | ".join(f"held-out gain k={k}" for k in ks) + " |",
             "|---" * (2 + 2 * len(ks)) + "|"]
    for (size, method), by_k in heldin.items():
        cells = [f"{by_k[k][0]:.3f} ± {by_k[k][1]:.3f}" if k in by_k else "" for k in ks]
        gains = heldout[(size, method)]
        cells += [f"{gains[k][0]:+.3f} ± {gains[k][1]:.3f}" if k in gains else "" for k in ks]
        lines.append(f"| {size} | {method} | " + " | ".join(cells) + " |")
    lines += ["", "Spread between methods (max − min of the mean normalized held-in accuracy):", ""]
    for size in dict.fromkeys(r["size"] for r in rows):
        spreads = []
        for k in ks:
            values = [by_k[k][0] for (s, _), by_k in heldin.items() if s == size and k in by_k]
            if values:
                spreads.append(f"k={k}: {max(values) - min(values):.3f}")
        lines.append(f"- {size}: " + ", ".join(spreads))
    lines.append(f"\nWhole run: {seconds:.0f}s.")
    return "\n".join(line for line in lines if line is not None) + "\n"


def run_study(cfg: StudyConfig, log: Callable[[str], None] = print) -> str:
    from mergesmith.checks import prepare_output_dir, resolve_device
    from mergesmith.paths import OutputLock

    problems = study_problems(cfg)
    if problems:
        raise InputError(problems)
    cfg.device = resolve_device(cfg.device)
    with OutputLock(cfg.out):
        prepare_output_dir(cfg.out)
        start = time.time()
        rows: list[dict] = []
        for size in cfg.sizes:
            rows += run_size(cfg, size, log)
        with (cfg.out / "scaling.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        plot(cfg.out / "heldin.png", rows, "normalized_heldin", "normalized held-in accuracy", cfg.sizes)
        plot(cfg.out / "heldout.png", rows, "heldout_gain", "held-out gain over the base", cfg.sizes)
        text = markdown(cfg, rows, time.time() - start)
        (cfg.out / "study.md").write_text(text)
        (cfg.out / "results.json").write_text(json.dumps({
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in cfg.__dict__.items()},
            "rows": rows}, indent=1, default=str))
        return text
