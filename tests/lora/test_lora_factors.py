"""The low-rank algebra of mergesmith.lora.factors, on hand-made matrices."""

from __future__ import annotations

import pytest
import torch

from mergesmith.lora.factors import (
    choose_rank,
    concat_factors,
    lora_scale,
    randomized_svd,
    rank_for_energy,
    residual_error,
    split_singular_values,
    svd_of_product,
    thin_svd,
    truncation_error,
)


def decaying(m: int, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A matrix with singular values 0.8^i, and those values."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, min(m, n), generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, min(m, n), generator=g, dtype=torch.float64))[0]
    s = 0.8 ** torch.arange(min(m, n), dtype=torch.float64)
    return (u * s) @ v.T, s


def test_scale_and_exact_concatenation():
    assert lora_scale(16, 4, False) == 4 and lora_scale(16, 4, True) == 8
    g = torch.Generator().manual_seed(1)
    pairs = [(torch.randn(r, 7, generator=g), torch.randn(5, r, generator=g)) for r in (2, 3)]
    a, b = concat_factors(pairs, [0.5, -2.0])
    assert a.shape == (5, 7) and b.shape == (5, 5)
    torch.testing.assert_close(b @ a, 0.5 * pairs[0][1] @ pairs[0][0] - 2.0 * pairs[1][1] @ pairs[1][0])


@pytest.mark.parametrize("shape", [(40, 12), (12, 40)])
def test_thin_svd_from_the_smaller_side(shape):
    matrix, s = decaying(*shape)
    u, got, vh = thin_svd(matrix)
    torch.testing.assert_close(got, s)
    torch.testing.assert_close((u * got) @ vh, matrix)


def test_svd_of_product_never_forms_the_product_and_agrees():
    g = torch.Generator().manual_seed(2)
    b, a = torch.randn(30, 6, generator=g, dtype=torch.float64), torch.randn(6, 50, generator=g, dtype=torch.float64)
    u, s, vh = svd_of_product(b, a)
    torch.testing.assert_close(s, torch.linalg.svdvals(b @ a)[:6])
    torch.testing.assert_close((u * s) @ vh, b @ a)
    a_k, b_k = split_singular_values(u, s, vh, 2)
    best = torch.linalg.svd(b @ a)
    torch.testing.assert_close(b_k @ a_k, (best.U[:, :2] * best.S[:2]) @ best.Vh[:2])
    torch.testing.assert_close(a_k.norm(dim=1), b_k.norm(dim=0))  # sqrt(S) on each side


def test_rank_by_count_energy_threshold_and_the_error():
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])
    assert rank_for_energy(s, 9 / 14) == 1 and rank_for_energy(s, 0.7) == 2 and rank_for_energy(s, 1.0) == 3
    assert choose_rank(s, rank=3, energy=0.9) == 2 and choose_rank(s, threshold=1.5) == 2
    assert choose_rank(torch.zeros(3), energy=0.5) == 1
    assert truncation_error(s, 2) == pytest.approx((1 / 14) ** 0.5)
    assert truncation_error(torch.zeros(2), 1) == 0.0


def test_randomized_svd_finds_the_leading_triplets():
    matrix, s = decaying(300, 200)
    u, got, vh = randomized_svd(matrix, 8)
    torch.testing.assert_close(got[:8], s[:8], rtol=1e-9, atol=0)
    a, b = split_singular_values(u, got, vh, 8)
    assert residual_error(matrix, a, b) == pytest.approx(truncation_error(s, 8), rel=1e-6)
