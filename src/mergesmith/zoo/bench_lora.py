"""LoRA rows of the benchmark (``mergesmith bench --lora ROWS``, docs/lora.md).

The zoo's LoRA pool (one adapter per trained skill, ``build.build_lora_pool``) merged two ways,
and the full experts compressed into adapters:

- ``pool``: ``lora:<skill>``, every adapter of the pool folded into the base (the zoo's two LoRA
  experts are rows of every bench already);
- ``concat``, ``ties``, ``knots_ties``, ``core_ties``, ``core_tsv``: ``lora-merge:<row>``, the eight
  adapters merged in adapter space by ``mergesmith merge-lora`` (exact concatenation; TIES on the
  full deltas truncated to rank Σ r_i, the concatenation's rank; TIES on KnOTS coordinates; TIES and
  TSV-M in the core space), the merged adapter then folded into the base;
- ``fold_ties``, ``fold_tsv_m``: ``lora-fold:<method>``, the folded models ``base+adapter`` merged
  as full models by ``mergesmith merge`` (the same methods, no truncation);
- ``extract``: ``extract:r<k>:<skill>``, each full expert's adapter from ``mergesmith extract-lora``
  at ranks ``EXTRACT_RANKS`` (embeddings and LM head as LoRA too, norms saved whole), folded back.

Merge rows choose their hyperparameters on validation like the merge rows of the table (the same
grids; a concatenation's weight is task arithmetic's lambda, which it equals); test data is never
read while choosing. Every folded model is written by PEFT's ``merge_and_unload``, the reference
for what an adapter means, evaluated, then removed.
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

# row -> (merge-lora method, space); the grids are the bench's (zoo/bench.py, GRIDS)
ADAPTER_ROWS: dict[str, tuple[str, str]] = {
    "concat": ("concat", "full"),
    "ties": ("ties", "full"),
    "knots_ties": ("ties", "knots"),
    "core_ties": ("ties", "core"),
    "core_tsv": ("tsv_m", "core"),
}
FOLDED_ROWS: dict[str, str] = {"fold_ties": "ties", "fold_tsv_m": "tsv_m"}
# The default zoo's modules are 192 or 512 wide; 64 is the concatenation's rank (8 skills x rank 8).
EXTRACT_RANKS = (4, 16, 64)
LORA_ROWS = ("pool", *ADAPTER_ROWS, *FOLDED_ROWS, "extract")


def parse_lora_rows(text: str) -> tuple[str, ...]:
    """'all' or comma-separated names of ``LORA_ROWS``; every unknown name is reported at once."""
    if text.strip() == "all":
        return LORA_ROWS
    rows = tuple(r.strip() for r in text.split(",") if r.strip())
    unknown = [r for r in rows if r not in LORA_ROWS]
    if unknown:
        raise InputError(f"--lora: {', '.join(unknown)} not a LoRA row; choose 'all' or from {', '.join(LORA_ROWS)}")
    return rows


# ----------------------------------------------------------------------------- recipes


def adapter_recipe(zoo, pool: dict[str, Path], row: str, point: dict, seed: int, rank: int) -> dict:
    """A ``merge-lora`` recipe merging the pool's adapters (every trained skill) for ``row``.

    Per-adapter parameters of the point (``density``, a concatenation's ``weight``) go on every
    adapter, as ``bench.recipe_for`` does for full experts; full-delta merges truncate to ``rank``.
    """
    from mergesmith.lora.merge import adapter_methods

    method, space = ADAPTER_ROWS[row]
    spec = adapter_methods()[method]
    per_model = {k: v for k, v in point.items() if spec.param(k) is not None and spec.param(k).per_model}
    params = {k: v for k, v in point.items() if k not in per_model}
    if spec.param("weight") is not None:
        per_model.setdefault("weight", 1.0)
    if method != "concat":
        params["space"] = space
        if space == "full":  # KnOTS and core space keep their (at most Σ r_i) rank whole
            params["rank"] = rank
    recipe = {"merge_method": method, "base_model": str(zoo.base),
              "models": [{"model": str(pool[s]), "parameters": dict(per_model)} for s in zoo.trained],
              "random_seed": seed}
    if params:
        recipe["parameters"] = params
    return recipe


def adapter_grid(row: str) -> list[dict]:
    from mergesmith.zoo.bench import GRIDS, TA_LAMBDAS

    method, _ = ADAPTER_ROWS[row]
    # concatenation with weight w on every adapter is task arithmetic with lambda w: the same grid
    return [{"weight": w} for w in TA_LAMBDAS] if method == "concat" else GRIDS[method]


def folded_zoo(zoo, pool: dict[str, Path]):
    """``zoo`` whose experts are the folded adapters ``base+adapter`` (docs/engine.md), so that the
    bench's own recipes and validation search merge them as full models."""
    return replace(zoo, experts={s: f"{zoo.base}+{pool[s]}" for s in zoo.trained})


def fold(adapter: Path, base: Path, folder: Path) -> Path:
    from mergesmith.zoo.lora import materialize_lora

    shutil.rmtree(folder, ignore_errors=True)
    return materialize_lora(adapter, base, folder)


def merged_adapter_model(recipe: dict, base: Path, folder: Path) -> Path:
    """Merge the adapters of ``recipe`` and fold the result into ``base`` at ``folder``."""
    from mergesmith.lora.merge import merge_lora

    adapter = folder.with_name(folder.name + "-adapter")
    try:
        merge_lora(recipe, adapter, overwrite=True, progress=False)
        return fold(adapter, base, folder)
    finally:
        shutil.rmtree(adapter, ignore_errors=True)


def extracted_model(expert: Path, base: Path, rank: int, folder: Path) -> Path:
    from mergesmith.lora.extract import extract_lora

    adapter = folder.with_name(folder.name + "-adapter")
    try:
        extract_lora(expert, base, adapter, extract_options(rank))
        return fold(adapter, base, folder)
    finally:
        shutil.rmtree(adapter, ignore_errors=True)


def merged_model(recipe: dict, folder: Path, device: str) -> Path:
    """A full-model merge (``mergesmith merge``) written to ``folder``."""
    from mergesmith.zoo.bench import merge_into

    merge_into(recipe, folder, device)
    return folder


def extract_options(rank: int):
    from mergesmith.lora.extract import ExtractOptions

    # exact SVD: at these widths the randomized one saves nothing and its estimate would vary by seed
    return ExtractOptions(max_rank=rank, embed_lora=True, svd="exact", overwrite=True, progress=False)


# ----------------------------------------------------------------------------- the rows




@dataclass(frozen=True)
class LoraRows:
    """The LoRA rows of a bench (``BenchConfig.extra_rows``): ``names`` from ``LORA_ROWS``."""

    names: tuple[str, ...]

    def rows(self, cfg, zoo, seed: int, val, cache, work: Path, result, log: Callable[[str], None]) -> Iterator[Row]:
        return lora_rows(self.names, cfg, zoo, seed, val, cache, work, result, log)

    def section(self, results, trained: tuple[str, ...], heldout: tuple[str, ...], generation: bool) -> list[str]:
        return lora_section(results, trained, heldout, generation)


def lora_rows(rows: tuple[str, ...], cfg, zoo, seed: int, val, cache, work: Path, result,
              log: Callable[[str], None]) -> Iterator[Row]:
    """Yield ``rows``, each once its hyperparameters are chosen (recorded in ``result.chosen`` and
    ``result.validation``). The bench evaluates each model, then removes it."""
    from mergesmith.zoo.bench import mean, score, select, task_set_key
    from mergesmith.zoo.build import build_lora_pool

    needs_pool = any(r == "pool" or r in ADAPTER_ROWS or r in FOLDED_ROWS for r in rows)
    pool = build_lora_pool(zoo, cfg.device, progress=cfg.progress) if needs_pool else {}
    if "pool" in rows:
        for skill in zoo.trained:
            if skill not in zoo.lora:  # the manifest's LoRA experts are rows of the table already
                adapter = pool[skill]
                yield f"lora:{skill}", f"{adapter}|lora", lambda f, a=adapter: fold(a, zoo.base, f)
    rank = zoo.manifest["settings"]["lora_rank"] * len(zoo.trained)  # the concatenation's
    val_key = task_set_key(val)
    scratch = work / "lora-val" / f"seed{seed}"
    for row in (r for r in rows if r in ADAPTER_ROWS):
        grid, trials = adapter_grid(row), []
        for i, point in enumerate(grid if len(grid) > 1 else []):
            recipe = adapter_recipe(zoo, pool, row, point, seed, rank)
            key = f"{zoo.root}|lora-merge|{json.dumps(recipe, sort_keys=True)}|validation|limit={cfg.val_limit}|{val_key}"

            def run(recipe=recipe, i=i) -> dict:
                folder = scratch / f"{row}-{i}"
                try:
                    return score(merged_adapter_model(recipe, zoo.base, folder), val, cfg.device, cfg.batch_size)
                finally:
                    shutil.rmtree(folder, ignore_errors=True)

            scores = cache.get_or_run(key, run)
            trials.append({"params": point, "validation": round(mean(scores.values()), 4)})
        # as bench.select: the best validation accuracy, the first point of the grid on a tie
        best = max(range(len(trials)), key=lambda i: (trials[i]["validation"], -i)) if trials else 0
        name = f"lora-merge:{row}"
        result.chosen[name], result.validation[name] = grid[best], trials
        log(f"seed {seed}: {name:22s} chose {grid[best]}")
        recipe = adapter_recipe(zoo, pool, row, grid[best], seed, rank)
        yield (name, f"{zoo.root}|lora-merge|{json.dumps(recipe, sort_keys=True)}",
               lambda f, r=recipe: merged_adapter_model(r, zoo.base, f))
    folded = folded_zoo(zoo, pool) if pool else None
    for row in (r for r in rows if r in FOLDED_ROWS):
        from mergesmith.zoo.bench import recipe_for

        method = FOLDED_ROWS[row]
        best, trials = select(cfg, folded, method, seed, val, cache, scratch, log)
        name = f"lora-fold:{method}"
        result.chosen[name], result.validation[name] = best, trials
        log(f"seed {seed}: {name:22s} chose {best}")
        recipe = recipe_for(folded, method, best, seed)
        yield (name, f"{zoo.root}|{json.dumps(recipe, sort_keys=True)}",
               lambda f, r=recipe: merged_model(r, f, cfg.device))
    if "extract" in rows:
        for rank_k in EXTRACT_RANKS:
            options = {k: v for k, v in extract_options(rank_k).__dict__.items() if k not in ("progress", "overwrite")}
            for skill in zoo.trained:
                expert = zoo.experts[skill]
                yield (f"extract:r{rank_k}:{skill}", f"{expert}|extract|{json.dumps(options, sort_keys=True, default=str)}",
                       lambda f, e=expert, k=rank_k: extracted_model(e, zoo.base, k, f))


# ----------------------------------------------------------------------------- the report


def _mean_sd(values: list[float]) -> str:
    m = sum(values) / len(values)
    return f"{m:.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{m:.3f}"


def lora_section(results, trained: tuple[str, ...], heldout: tuple[str, ...], generation: bool) -> list[str]:
    """Markdown for table.md: the LoRA rows side by side, and the extracted adapters' accuracy kept
    against rank. Empty when the run had no LoRA rows."""
    names = list(results[0].scores)
    merged = [n for n in names if n.startswith(("lora-merge:", "lora-fold:"))]
    ranks = sorted({int(n.split(":")[1][1:]) for n in names if n.startswith("extract:")})
    if not merged and not ranks and not any(n.startswith("lora:") for n in names):
        return []
    forms = ("mc", "gen") if generation else ("mc",)

    def avg(r, name: str, form: str, skills) -> float:
        return sum(r.scores[name][form][s] for s in skills) / len(skills)

    parts = ["", "## LoRA rows (docs/lora.md)", ""]
    if merged:
        full = [n for n in names if n.startswith("merge:")]  # the run's merges of the full experts
        cols = [f"{f} {a}" for f in forms for a in ("avg_trained", "avg_heldout")]
        parts += ["Adapter-space merges of the LoRA pool (`lora-merge:`) against merges of the folded adapters "
                  "(`lora-fold:`) and of the full experts (`merge:`). mc: multiple-choice accuracy; gen: greedy "
                  "exact match.", "", "| row | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for name in [*merged, *full]:
            cells = [_mean_sd([avg(r, name, f, skills) for r in results])
                     for f in forms for skills in (trained, heldout)]
            parts.append(f"| {name} | " + " | ".join(cells) + " |")
    if ranks or any(n.startswith("lora:") for n in names):
        parts += ["", "Accuracy kept on each expert's own skill: the mean over the trained skills of "
                  "score(adapter of skill s, on s) / score(expert:s, on s), and the mean own-skill score. "
                  "`extract r<k>`: the full expert's adapter extracted at rank k; `trained LoRA`: the pool's "
                  f"adapter (rank {_pool_rank(results)}) trained on the skill.", "",
                  "| adapter | " + " | ".join(f"{f} kept | {f} own score" for f in forms) + " |",
                  "|---" * (2 * len(forms) + 1) + "|"]
        sources = [(f"extract r{k}", lambda s, k=k: f"extract:r{k}:{s}") for k in ranks]
        if all(f"lora:{s}" in names for s in trained):
            sources.append(("trained LoRA", lambda s: f"lora:{s}"))
        sources.append(("full expert", lambda s: f"expert:{s}"))
        for label, row_of in sources:
            cells = []
            for form in forms:
                kept, own = [], []
                for r in results:
                    pairs = [(r.scores[row_of(s)][form][s], r.scores[f"expert:{s}"][form][s]) for s in trained]
                    kept.append(sum(a / e for a, e in pairs if e > 0) / max(1, sum(e > 0 for _, e in pairs)))
                    own.append(sum(a for a, _ in pairs) / len(pairs))
                cells += [_mean_sd(kept), _mean_sd(own)]
            parts.append(f"| {label} | " + " | ".join(cells) + " |")
    return parts


def _pool_rank(results) -> int:
    from mergesmith.zoo.build import Zoo

    return Zoo.load(Path(results[0].zoo_root)).manifest["settings"]["lora_rank"]
