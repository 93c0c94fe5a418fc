"""Fisher merging in row blocks: each block reads its rows of every input's Fisher, the norms whole.

Fisher merging is entry-wise (``methods/data_aware.py``): an output entry depends on the same
entry of every input and of every input's Fisher, and on per-model scalars (the whole-model
norms). So the engine may merge a tensor a block of rows at a time, reading only those rows of
the Fisher diagonals, and must write the very bytes of the whole-tensor merge. Statistics of
another shape (RegMean's Gram matrices) keep a tensor whole.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import mergesmith
from mergesmith.api import plan_merge
from mergesmith.calibrate import StatRef, StatsStore
from mergesmith.engine import MergeOptions, row_spans
from mergesmith.methods import TensorGroup, get_method
from tests.calibrate.calibration_data import write_calibration
from tests.engine.test_row_blocks import EMBED, TINY_CHUNK, assert_blocks_equal_whole, blocked_tensors

WEIGHT_GRADIENT = [{"filter": "mlp", "value": [0.2, 0.9]}, {"value": 0.4}]


@pytest.fixture(scope="module")
def fisher_cache(model_family, tmp_path_factory) -> tuple[list[Path], Path, Path]:
    """Three fine-tunes, a calibration file, and a cache holding each model's Fisher (computed once)."""
    _, fts = model_family("llama", 3)
    root = tmp_path_factory.mktemp("fisher-rows")
    data = write_calibration(root / "cal.jsonl")
    cache = root / "cache"
    mergesmith.merge(fisher_recipe(fts, data, cache), root / "first", progress=False)
    return fts, data, cache


def fisher_recipe(fts, data, cache, method: str = "fisher", **params) -> dict:
    """Per-model weights with a filter and a layer gradient, so blocks of different tensors differ."""
    weights = [WEIGHT_GRADIENT, 0.8, 1.2]
    return {"merge_method": method, "dtype": "float32", "parameters": params,
            "models": [{"model": str(m), "parameters": {"weight": w} if method == "fisher" else {}}
                       for m, w in zip(fts, weights)],
            "calibration": {"files": [str(data)], "samples": 5, "max_length": 8, "batch_size": 2,
                            "cache_dir": str(cache)}}


@pytest.mark.parametrize("normalize", [True, False])
def test_fisher_row_blocks_write_the_bytes_of_the_whole_merge(normalize, fisher_cache, tmp_path):
    fts, data, cache = fisher_cache
    r = fisher_recipe(fts, data, cache, normalize_fisher=normalize)
    plan = plan_merge(r)
    try:
        embed = next(t for t in plan.tensors if t.name == EMBED)
        assert [sorted(refs) for refs in embed.stats] == [["fisher", "fisher_norm"]] * 3  # Fisher-weighted
        assert plan.stats.missing() == []  # the fixture's cache: no calibration in this test
    finally:
        for m in plan.models:
            m.checkpoint.close()
    blocked = blocked_tensors(r)
    assert {EMBED, "lm_head.weight", "model.norm.weight", "model.layers.0.mlp.up_proj.weight"} <= set(blocked)
    assert_blocks_equal_whole(r, tmp_path)


def test_fisher_rows_are_read_in_blocks_and_the_norms_whole(fisher_cache, tmp_path, monkeypatch):
    fts, data, cache = fisher_cache
    reads: list[tuple[str, object, tuple[int, ...]]] = []
    read = StatsStore.read

    def spy(ref: StatRef, rows=None) -> torch.Tensor:
        out = read(ref, rows)
        reads.append((ref.key, rows, tuple(out.shape)))
        return out

    monkeypatch.setattr(StatsStore, "read", staticmethod(spy))
    mergesmith.merge(fisher_recipe(fts, data, cache), tmp_path / "out", progress=False, chunk_bytes=TINY_CHUNK)
    embed = [(rows, shape) for key, rows, shape in reads if key == EMBED]  # the Fisher is keyed by its tensor
    assert len(embed) == 3 * 64  # 64 blocks of one row (384 bytes of inputs and Fishers each), three models
    assert all(rows is not None and shape == (rows[1] - rows[0], 16) for rows, shape in embed)
    assert sorted({rows for rows, _ in embed}) == [(i, i + 1) for i in range(64)]
    norms = [(rows, shape) for key, rows, shape in reads if key == "fisher_norm"]
    assert norms and all(rows is None and shape == () for rows, shape in norms)


def test_fisher_blocks_cut_the_predicted_peak(fisher_cache):
    """Whole, the embedding's three inputs and three Fishers (and their float64 sums) dominate the
    peak; in blocks of at most C bytes of inputs and Fishers, the peak is a few C."""
    fts, data, cache = fisher_cache
    plan = plan_merge(fisher_recipe(fts, data, cache))
    try:
        n, chunk = 3, 1024
        whole = plan.predicted_peak_bytes(MergeOptions(prefetch_bytes=0, chunk_bytes=0))
        blocks = plan.predicted_peak_bytes(MergeOptions(prefetch_bytes=0, chunk_bytes=chunk))
        embedding = n * 64 * 16 * 4  # its inputs, and as much again its Fishers
        norms = 3 * n * 4  # the scalars every block reads whole, counted three times as statistics are
        # A block: (2n + 2) slots of its inputs (at most C/n each), its statistics three times (at
        # most C in all), the next block's C, two outputs of C/n.
        assert blocks <= (2 * n + 2) * chunk // n + 3 * chunk + norms + chunk + 2 * chunk // n
        assert whole >= 3 * embedding + (2 * n + 2) * embedding // n > 2 * blocks
        assert "tensors merged in blocks of rows" in plan.describe(MergeOptions(chunk_bytes=chunk), full=False)
    finally:
        for m in plan.models:
            m.checkpoint.close()


def test_statistics_of_another_shape_keep_a_tensor_whole(fisher_cache):
    """A Gram-like statistic ([in, in]) or a per-column one ([in]) spans every row: no blocks. A
    scalar stored in a file is read whole with each block, like the norms."""
    fts, data, cache = fisher_cache
    plan = plan_merge(fisher_recipe(fts, data, cache))
    try:
        embed = next(t for t in plan.tensors if t.name == EMBED)
        assert row_spans(plan, embed, TINY_CHUNK) != [None]
        fisher = embed.stats[1]["fisher"]
        for shape, whole in [((16, 16), True), ((16,), True), ((1, 16), True), ((), False)]:
            embed.stats[1]["other"] = StatRef(fisher.file, fisher.key, shape)
            assert (row_spans(plan, embed, TINY_CHUNK) == [None]) == whole, shape
    finally:
        for m in plan.models:
            m.checkpoint.close()


def test_regmean_stays_whole(model_family, tmp_path):
    """RegMean solves with each linear weight's [in, in] Gram: never in blocks, Grams cached or not."""
    _, fts = model_family("llama", 3)
    data = write_calibration(tmp_path / "cal.jsonl")
    r = fisher_recipe(fts[:2], data, tmp_path / "cache", method="regmean")
    mergesmith.merge(r, tmp_path / "out", progress=False, chunk_bytes=TINY_CHUNK)
    plan = plan_merge(r)
    try:
        q = next(t for t in plan.tensors if t.name == "model.layers.0.self_attn.q_proj.weight")
        assert [sorted(refs) for refs in q.stats] == [["gram"]] * 2
    finally:
        for m in plan.models:
            m.checkpoint.close()
    assert blocked_tensors(r) == {}


@pytest.mark.parametrize("with_fisher", [True, False])
def test_the_merge_step_on_a_block_of_rows_is_that_block_of_the_whole(with_fisher):
    """The method alone, on rows 2:5: the Fisher-weighted path and the average a tensor without
    every model's Fisher falls back on (here one model has none)."""
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(7, 5, generator=gen) for _ in range(3)]
    stats = [{"fisher": torch.rand(7, 5, generator=gen), "fisher_norm": torch.tensor(float(i + 1))}
             for i in range(3)]
    if not with_fisher:
        stats[2] = {}

    def group(rows: slice) -> TensorGroup:
        return TensorGroup("p", [t[rows] for t in tensors], {"epsilon": 1e-6, "normalize_fisher": True},
                           [{"weight": w} for w in (0.3, 0.7, 1.0)],
                           stats=[{k: (v[rows] if k == "fisher" else v) for k, v in s.items()} for s in stats])

    fisher = get_method("fisher").fn
    assert torch.equal(fisher(group(slice(2, 5))), fisher(group(slice(None)))[2:5])
