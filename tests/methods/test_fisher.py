"""Fisher merging: a hand-computed case, properties, and FusionBench 0.2.33's merge step."""

from __future__ import annotations

import pytest
import torch
from fusion_bench.method.fisher_merging.fisher_merging import merging_with_fisher_weights

from mergesmith.methods import TensorGroup, get_method


def run(tensors, fishers, norms, weights=None, normalize=True, epsilon=1e-6):
    weights = weights or [1.0] * len(tensors)
    stats = [{"fisher": f, "fisher_norm": torch.tensor(n, dtype=torch.float64)} if f is not None else {}
             for f, n in zip(fishers, norms)]
    group = TensorGroup("p", tensors, {"epsilon": epsilon, "normalize_fisher": normalize},
                        [{"weight": w} for w in weights], stats=stats)
    return get_method("fisher").fn(group)


def test_hand_computed():
    theta = [torch.tensor([1.0]), torch.tensor([3.0])]
    fisher = [torch.tensor([3.0]), torch.tensor([1.0])]
    # Unnormalized: (3*1 + 1*3) / (3 + 1) = 1.5.
    assert run(theta, fisher, [1.0, 3.0], normalize=False, epsilon=0.0).item() == pytest.approx(1.5)
    # Normalized by whole-model norms 1 and 3: λ' = [1, 1/3] / (4/3) = [.75, .25];
    # (.75*3*1 + .25*1*3) / (.75*3 + .25*1) = 3 / 2.5 = 1.2.
    assert run(theta, fisher, [1.0, 3.0], epsilon=0.0).item() == pytest.approx(1.2)
    # λ scales a model: weights [1, 3] unnormalized: (3 + 9) / (3 + 3) = 2.
    assert run(theta, fisher, [1.0, 1.0], weights=[1.0, 3.0], normalize=False, epsilon=0.0).item() == \
        pytest.approx(2.0)


def test_zero_fisher_falls_back_on_the_floor_as_an_average():
    theta = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])]
    out = run(theta, [torch.zeros(2), torch.zeros(2)], [0.0, 0.0])
    torch.testing.assert_close(out, torch.tensor([2.0, 3.0]))


def test_missing_statistics_give_the_average():
    theta = [torch.tensor([1.0]), torch.tensor([3.0])]
    assert run(theta, [torch.tensor([5.0]), None], [1.0, 1.0]).item() == pytest.approx(2.0)


@pytest.mark.parametrize("normalize", [True, False])
def test_equals_fusion_bench(normalize):
    gen = torch.Generator().manual_seed(3)
    shapes = {"a.weight": (4, 5), "a.bias": (4,), "norm.weight": (5,)}
    n = 3
    params = {k: [torch.randn(s, generator=gen) for _ in range(n)] for k, s in shapes.items()}
    # Fishers of different overall sizes, with zeros, so that the floor and the normalization both matter.
    fishers = [{k: torch.rand(s, generator=gen) ** 3 * (i + 1) ** 2 for k, s in shapes.items()} for i in range(n)]
    fishers[0]["a.bias"][0] = 0.0
    coefficients = torch.tensor([0.3, 0.7, 1.0])
    expected = merging_with_fisher_weights(params, fishers, coefficients, normalize_fisher_weight=normalize,
                                           minimal_fisher_weight=1e-6)
    norms = [sum(float((f ** 2).sum()) for f in fi.values()) ** 0.5 for fi in fishers]
    for k in shapes:
        got = run(params[k], [fi[k] for fi in fishers], norms, weights=coefficients.tolist(), normalize=normalize)
        torch.testing.assert_close(got, expected[k], rtol=1e-5, atol=1e-5)
