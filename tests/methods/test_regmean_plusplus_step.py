"""RegMean++'s merge step: RegMean's step on the ``gram_plusplus`` statistics, and FusionBench's RegMean++ step."""

from __future__ import annotations

import pytest
import torch

from mergesmith.methods import TensorGroup, get_method


def run(tensors, grams, alpha=1.0, kind="gram_plusplus", name="layer.weight"):
    stats = [{kind: g} if g is not None else {} for g in grams]
    group = TensorGroup(name, tensors, {"alpha": alpha}, [{} for _ in tensors], stats=stats)
    return get_method("regmean_plusplus").fn(group)


def test_hand_computed():
    # As RegMean's: G̃1 = [[2, .5], [.5, 1]] (alpha .5), G̃2 = I; ΣG̃ = [[3, .5], [.5, 2]], ΣG̃Wᵀ = [2, 1.5];
    # w = [(4 - .75) / 5.75, (4.5 - 1) / 5.75] = [13/23, 14/23].
    w1, w2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    out = run([w1, w2], [torch.tensor([[2.0, 1.0], [1.0, 1.0]]), torch.eye(2)], alpha=0.5)
    torch.testing.assert_close(out, torch.tensor([[13 / 23, 14 / 23]]))


def test_reads_only_its_own_statistics():
    # Plain RegMean Grams (kind "gram") are not RegMean++'s: without gram_plusplus, the paper's average.
    ws = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])]
    g = [torch.tensor([[2.0, 1.0], [1.0, 1.0]]), torch.eye(2)]
    torch.testing.assert_close(run(ws, g, alpha=0.5, kind="gram"), torch.tensor([[0.5, 0.5]]))
    torch.testing.assert_close(run(ws, [g[0], None], alpha=0.5), torch.tensor([[0.5, 0.5]]))


def test_spec_declares_its_statistics():
    spec = get_method("regmean_plusplus")
    assert spec.needs_stats == ("gram_plusplus",) and spec.param("alpha").default == 0.1


@pytest.mark.parametrize("alpha", [0.1, 0.9])
def test_equals_fusion_bench_regmean_plusplus_step(alpha):
    from fusion_bench.method.regmean_plusplus.regmean_plusplus import merging_with_regmean_weights

    gen = torch.Generator().manual_seed(0)
    ws = [torch.randn(6, 5, generator=gen) for _ in range(3)]
    grams = []
    for _ in ws:
        x = torch.randn(40, 5, generator=gen)
        grams.append(x.T @ x / 40)
    expected = merging_with_regmean_weights({"fc.weight": ws}, [{"fc": g} for g in grams],
                                            reduce_non_diagonal_ratio=alpha)["fc.weight"]
    torch.testing.assert_close(run(ws, grams, alpha=alpha), expected, rtol=1e-5, atol=1e-5)
