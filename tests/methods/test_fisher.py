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


def fisher_as_before(group: TensorGroup) -> torch.Tensor:
    """The merge step as it was written before its in-place rewrite (a float64 temporary per op)."""
    eps = group.params["epsilon"]
    coefficients = torch.tensor([p["weight"] for p in group.model_params], dtype=torch.float64)
    if group.params["normalize_fisher"]:
        norms = torch.stack([s["fisher_norm"].to(torch.float64) for s in group.stats])
        inverse = 1.0 / (norms + eps)
        coefficients = coefficients * inverse / inverse.sum()
    numerator = torch.zeros_like(group.tensors[0], dtype=torch.float64)
    denominator = torch.zeros_like(numerator)
    for c, s, theta in zip(coefficients.tolist(), group.stats, group.tensors):
        weighted = c * (s["fisher"].to(torch.float64) + eps)
        numerator += weighted * theta
        denominator += weighted
    return (numerator / denominator).to(group.tensors[0].dtype)


def fisher_entry_by_entry(tensors, fishers, coefficients, eps) -> torch.Tensor:
    """The formula on Python floats (IEEE doubles, rounded after each step as torch's float64 ops are)."""
    out = torch.empty_like(tensors[0])
    flat = [t.reshape(-1).tolist() for t in tensors]
    flat_f = [f.reshape(-1).tolist() for f in fishers]
    for i in range(out.numel()):
        numerator = denominator = 0.0
        for c, theta, f in zip(coefficients, flat, flat_f):
            weighted = c * (f[i] + eps)
            numerator += weighted * theta[i]
            denominator += weighted
        out.view(-1)[i] = numerator / denominator
    return out


def random_group(seed: int, shape, dtype, normalize: bool, n: int = 3) -> TensorGroup:
    gen = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(shape, generator=gen).to(dtype) for _ in range(n)]
    fishers = [torch.rand(shape, generator=gen) ** 3 * (i + 1) ** 2 for i in range(n)]
    fishers[0].view(-1)[::3] = 0.0  # the floor matters
    stats = [{"fisher": f, "fisher_norm": f.double().norm()} for f in fishers]
    return TensorGroup("p", tensors, {"epsilon": 1e-6, "normalize_fisher": normalize},
                       [{"weight": w} for w in (0.3, 0.7, 1.0)[:n]], stats=stats)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_in_place_merge_step_keeps_the_bits_of_the_plain_formula(normalize, dtype, monkeypatch):
    """The in-place rewrite (one float64 work tensor, products in slices) changes no bit: against the
    formula with a temporary per op, on shapes whose entries span several product slices, and
    against the formula evaluated entry by entry on Python floats."""
    import mergesmith.methods.data_aware as data_aware

    monkeypatch.setattr(data_aware, "PRODUCT_SLICE", 7)  # slices with a short tail, on small tensors
    fisher = get_method("fisher").fn
    for seed, shape in enumerate([(), (5,), (6, 9), (3, 4, 5)]):
        group = random_group(seed, shape, dtype, normalize)
        got = fisher(group)
        assert got.dtype == dtype and got.shape == shape
        assert torch.equal(got, fisher_as_before(group))
        coefficients = [0.3, 0.7, 1.0]
        if normalize:
            inverse = [1.0 / (float(s["fisher_norm"]) + 1e-6) for s in group.stats]
            coefficients = [c * i / sum(inverse) for c, i in zip(coefficients, inverse)]
        plain = fisher_entry_by_entry(group.tensors, [s["fisher"] for s in group.stats], coefficients, 1e-6)
        assert torch.equal(got, plain)


def test_in_place_merge_step_leaves_its_inputs_alone():
    group = random_group(9, (4, 6), torch.float32, True)
    before = [t.clone() for t in group.tensors] + [s["fisher"].clone() for s in group.stats]
    get_method("fisher").fn(group)
    after = group.tensors + [s["fisher"] for s in group.stats]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
