"""RegMean: a hand-computed case, properties, and FusionBench 0.2.33's merge step."""

from __future__ import annotations

import warnings

import pytest
import torch
from fusion_bench.method.regmean.regmean import merging_with_regmean_weights

from mergesmith.methods import TensorGroup, get_method


def run(tensors, grams, alpha=1.0, name="layer.weight"):
    stats = [{"gram": g} if g is not None else {} for g in grams]
    group = TensorGroup(name, tensors, {"alpha": alpha}, [{} for _ in tensors], stats=stats)
    return get_method("regmean").fn(group)


def gram_of(samples: int, width: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    x = torch.randn(samples, width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (x.T @ x / samples).to(dtype)


def test_hand_computed():
    # G̃1 = [[2, .5], [.5, 1]] (alpha .5), G̃2 = I; ΣG̃ = [[3, .5], [.5, 2]]; ΣG̃Wᵀ = [2, .5] + [0, 1] = [2, 1.5].
    # Solving: det 5.75, w = [(4 - .75) / 5.75, (4.5 - 1) / 5.75] = [13/23, 14/23].
    w1, w2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    g1, g2 = torch.tensor([[2.0, 1.0], [1.0, 1.0]]), torch.eye(2)
    out = run([w1, w2], [g1, g2], alpha=0.5)
    torch.testing.assert_close(out, torch.tensor([[13 / 23, 14 / 23]]))


def test_equal_grams_give_the_plain_average():
    ws = [torch.randn(5, 4, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    g = gram_of(50, 4, 0)
    torch.testing.assert_close(run(ws, [g, g, g], alpha=0.7), torch.stack(ws).mean(0), rtol=1e-5, atol=1e-5)


def test_identical_models_come_back_unchanged():
    w = torch.randn(3, 4)
    torch.testing.assert_close(run([w, w.clone()], [gram_of(30, 4, 1), gram_of(30, 4, 2)]), w, rtol=1e-5, atol=1e-5)


def test_tensors_without_a_gram_are_averaged():
    bias = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])]
    torch.testing.assert_close(run(bias, [None, None], name="layer.bias"), torch.tensor([2.0, 4.0]))
    ws = [torch.ones(2, 2), 3 * torch.ones(2, 2)]
    torch.testing.assert_close(run(ws, [torch.eye(2), None]), 2 * torch.ones(2, 2))  # one input lacks it


@pytest.mark.parametrize("alpha", [1.0, 0.6, 0.1])
def test_equals_fusion_bench(alpha):
    out_dim, in_dim, n = 6, 8, 3
    gen = torch.Generator().manual_seed(7)
    weights = [torch.randn(out_dim, in_dim, generator=gen) for _ in range(n)]
    biases = [torch.randn(out_dim, generator=gen) for _ in range(n)]
    grams = [gram_of(200, in_dim, 10 + i) for i in range(n)]
    expected = merging_with_regmean_weights({"fc.weight": weights, "fc.bias": biases},
                                            [{"fc": g} for g in grams], reduce_non_diagonal_ratio=alpha)
    torch.testing.assert_close(run(weights, grams, alpha=alpha), expected["fc.weight"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(run(biases, [None] * n, name="fc.bias"), expected["fc.bias"], rtol=1e-6, atol=1e-6)


def test_singular_sum_is_solved_with_a_ridge_and_a_warning():
    g = torch.tensor([[1.0, 0.0], [0.0, 0.0]])  # the second feature never varies
    with pytest.warns(UserWarning, match="singular; solved with a ridge"):
        out = run([torch.tensor([[1.0, 5.0]]), torch.tensor([[3.0, 7.0]])], [g, g])
    assert torch.isfinite(out).all()
    assert out[0, 0] == pytest.approx(2.0, abs=1e-4)


def test_large_condition_number_is_warned_about():
    g = torch.diag(torch.tensor([1.0, 1e-8], dtype=torch.float64))
    with pytest.warns(UserWarning, match="condition number of about 1.0e\\+08"):
        run([torch.eye(2, dtype=torch.float64)] * 2, [g, g])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run([torch.eye(2)] * 2, [torch.eye(2)] * 2)  # a well-conditioned sum says nothing


def test_a_gram_of_the_wrong_size_is_refused():
    with pytest.raises(ValueError, match="does not fit a weight of shape \\[2, 3\\]"):
        run([torch.ones(2, 3)] * 2, [torch.eye(2)] * 2)


def test_row_blocks_equal_the_whole_solve_bit_for_bit(monkeypatch):
    # A vocabulary-sized lm_head is solved a block of output rows at a time (data_aware.BLOCK_BYTES), so
    # that no float64 copy of the whole weight is held: each output row depends on its own input rows.
    import mergesmith.methods.data_aware as data_aware

    ws = [torch.randn(301, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    grams = [gram_of(80, 16, 10 + i, torch.float64) for i in range(3)]
    whole = run(ws, grams, alpha=0.9)
    monkeypatch.setattr(data_aware, "BLOCK_BYTES", 8 * 16 * 37)  # 37 rows a block: 9 blocks, the last short
    assert data_aware._row_blocks(301, 8 * 16)[-1] == (296, 301)
    blocked = run(ws, grams, alpha=0.9)
    scaled = [data_aware.scale_off_diagonal(g, 0.9) for g in grams]
    direct = torch.cholesky_solve(sum(g @ w.double().T for g, w in zip(scaled, ws)),
                                  torch.linalg.cholesky(sum(scaled))).T.float()
    assert torch.equal(blocked, whole) and torch.equal(whole, direct)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_average_fallback_equals_the_stacked_mean(dtype):
    from mergesmith.methods.data_aware import average

    ts = [torch.randn(40, 30, generator=torch.Generator().manual_seed(i)).to(dtype) for i in range(3)]
    out = average(ts)
    assert out.dtype == dtype and torch.equal(out, torch.stack(ts).mean(0))
