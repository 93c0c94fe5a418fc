"""The pruning pieces of the task-arithmetic family, against hand-computed cases from the
papers' equations and against mergekit's own sparsify functions."""

import math

import pytest
import torch
from mergekit import sparsify as mk

from mergesmith.methods import sparsify as sp


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- order statistics

@pytest.mark.parametrize("kind", ["normal", "ties", "sorted", "strided"])
def test_kth_smallest_equals_kthvalue(kind):
    n = 70_000  # above the size where the sampled bracket is used
    g = gen(1)
    if kind == "normal":
        x = torch.randn(n, generator=g).abs()
    elif kind == "ties":
        x = torch.randint(0, 7, (n,), generator=g).float()
    elif kind == "sorted":
        x = torch.arange(n, dtype=torch.float32)
    else:
        # Periodic with the sample stride, so the sample sees one value only and its
        # bracket is wrong: the function must fall back to the full selection.
        step = max(1, n // 32768)
        x = torch.arange(n, dtype=torch.float32) % step
        x[::step] = 5.0
    for k in (1, 2, 100, n // 3, n // 2, n - 100, n - 1, n):
        assert sp.kth_smallest(x, k) == torch.kthvalue(x, k).values, (kind, k)


def test_kth_smallest_rejects_bad_k():
    with pytest.raises(ValueError, match="k must be"):
        sp.kth_smallest(torch.ones(3), 4)


def test_smallest_mask_exact_count_and_ties_by_position():
    x = torch.tensor([1.0, 1.0, 1.0, 0.0])
    # the two smallest: 0 (index 3), then the first of the tied 1s (index 0)
    assert sp.smallest_mask(x, 2).tolist() == [True, False, False, True]
    assert sp.smallest_mask(x, 0).tolist() == [False] * 4
    assert sp.smallest_mask(x, 4).tolist() == [True] * 4
    many = torch.randint(0, 3, (80_000,), generator=gen(2)).float()
    for count in (1, 12_345, 40_000, 79_999):
        assert int(sp.smallest_mask(many, count).sum()) == count


# ---------------------------------------------------------------- TIES trim

def test_trim_by_magnitude_hand_computed():
    delta = torch.tensor([0.5, -3.0, 2.0, -1.0, 0.1])
    before = delta.clone()
    # k = max(1, floor(0.4 * 5)) = 2: keep the two largest |delta|, -3 and 2
    assert torch.equal(sp.trim_by_magnitude(delta, 0.4), torch.tensor([0.0, -3.0, 2.0, 0.0, 0.0]))
    # rescale to the L1 norm: 6.6 / 5 = 1.32
    assert torch.allclose(sp.trim_by_magnitude(delta, 0.4, rescale=True),
                          torch.tensor([0.0, -3.96, 2.64, 0.0, 0.0]))
    # a tiny density still keeps one entry
    assert torch.equal(sp.trim_by_magnitude(delta, 0.01), torch.tensor([0.0, -3.0, 0.0, 0.0, 0.0]))
    assert torch.equal(sp.trim_by_magnitude(delta, 1.0), delta)
    assert torch.equal(delta, before)


def test_trim_by_magnitude_breaks_ties_by_position():
    # k = floor(0.5 * 5) = 2 of four equal magnitudes: the later positions count as larger
    assert torch.equal(sp.trim_by_magnitude(torch.tensor([1.0, -1.0, 1.0, -1.0, 0.5]), 0.5),
                       torch.tensor([0.0, 0.0, 1.0, -1.0, 0.0]))
    many = torch.randint(-3, 4, (90_000,), generator=gen(20)).float()
    for count in (1, 30_000, 89_999):
        top = sp.largest_mask(many.abs(), count)
        assert int(top.sum()) == count
        assert torch.equal(top, ~sp.smallest_mask(many.abs(), many.numel() - count))


def test_trim_on_tied_bf16_deltas_keeps_mergekits_magnitudes():
    # Deltas of bf16 checkpoints take few distinct values, so many magnitudes tie at the
    # cut. Which tied entries survive may differ from mergekit's sort, but the kept
    # magnitudes (as a sorted list) must be the same.
    base = torch.randn(300, 257, generator=gen(21)).bfloat16()
    tuned = (base.float() + 0.01 * torch.randn(300, 257, generator=gen(22))).bfloat16()
    delta = tuned.float() - base.float()
    assert delta.abs().unique().numel() < delta.numel() / 20  # heavily tied
    for density in (0.1, 0.5):
        ours = sp.trim_by_magnitude(delta, density)
        theirs = mk.magnitude(delta, density, None)
        assert int((ours != 0).sum()) == int((theirs != 0).sum())
        assert torch.equal(ours.abs().flatten().sort().values, theirs.abs().flatten().sort().values)


@pytest.mark.parametrize("density", [0.05, 0.3, 0.5, 0.9])
@pytest.mark.parametrize("rescale", [False, True])
def test_trim_by_magnitude_matches_mergekit(density, rescale):
    delta = torch.randn(300, 257, generator=gen(3))  # > 65536 entries: sampled bracket
    ours = sp.trim_by_magnitude(delta, density, rescale=rescale)
    theirs = mk.magnitude(delta, density, mk.RescaleNorm.l1 if rescale else None)
    if rescale:
        assert torch.allclose(ours, theirs, rtol=1e-6, atol=0)
    else:
        assert torch.equal(ours, theirs)


# ---------------------------------------------------------------- Model Breadcrumbs

def test_breadcrumbs_band():
    # n = 10, keep floor(0.5*10) = 5, drop floor(0.2*10) = 2 largest: ranks [10-5-2, 8)
    assert sp.breadcrumbs_band(10, 0.5, 0.2) == (3, 8)
    # density 0.9 + gamma 0.2 > 1: the outlier cut shrinks to 1, ranks [0, 9)
    assert sp.breadcrumbs_band(10, 0.9, 0.2) == (0, 9)
    assert sp.breadcrumbs_band(10, 0.5, 0.0) == (5, 10)


def test_drop_outliers_and_small_hand_computed():
    delta = torch.tensor([-1.0, 2, -3, 4, -5, 6, -7, 8, -9, 10])
    # ascending rank of |delta| is |delta| - 1; ranks [3, 8) are |delta| in 4..8
    expected = torch.tensor([0.0, 0, 0, 4, -5, 6, -7, 8, 0, 0])
    assert torch.equal(sp.drop_outliers_and_small(delta, 0.5, 0.2), expected)
    # L1 rescale: 55 / 30
    assert torch.allclose(sp.drop_outliers_and_small(delta, 0.5, 0.2, rescale=True),
                          expected * (55 / 30))


@pytest.mark.parametrize("density,gamma", [(0.5, 0.01), (0.8, 0.1), (0.95, 0.1), (0.2, 0.0)])
@pytest.mark.parametrize("rescale", [False, True])
def test_drop_outliers_and_small_matches_mergekit(density, gamma, rescale):
    delta = torch.randn(300, 257, generator=gen(4))
    ours = sp.drop_outliers_and_small(delta, density, gamma, rescale=rescale)
    theirs = mk.magnitude_outliers(delta, density, mk.RescaleNorm.l1 if rescale else None, gamma)
    if rescale:
        assert torch.allclose(ours, theirs, rtol=1e-6, atol=0)
    else:
        assert torch.equal(ours, theirs)


# ---------------------------------------------------------------- DARE

def test_random_drop_rescales_kept_entries_by_one_over_p():
    delta = torch.randn(50_000, generator=gen(5))
    p = 0.3
    out = sp.random_drop(delta, p, gen(6))
    kept = out != 0
    # DARE: kept entries are delta / p exactly, whatever fraction happened to be kept
    # (mergekit's L1 rescale would scale by |delta|_1 / |kept|_1 instead).
    assert torch.allclose(out[kept], delta[kept] / p, rtol=1e-6, atol=0)
    # kept fraction ~ Binomial(n, p) / n: sd = sqrt(0.21 / 50000) = 0.002; allow 5 sd
    assert abs(kept.float().mean().item() - p) < 0.01
    out_plain = sp.random_drop(delta, p, gen(6), rescale=False)
    assert torch.equal(out_plain[kept], delta[kept])
    assert torch.equal(out_plain != 0, kept)  # same generator state, same mask


def test_random_drop_is_unbiased():
    # E[m * delta / p] = p * delta / p = delta. Over S draws the sample mean of an entry has
    # sd = |delta| sqrt((1 - p) / p) / sqrt(S) = 1 * 1 / sqrt(400) = 0.05 for p = 0.5;
    # without the rescale the mean would be 0.5 * delta, 10 sd away.
    delta = torch.where(torch.rand(200, generator=gen(7)) < 0.5, -1.0, 1.0)
    g = gen(8)
    mean = torch.stack([sp.random_drop(delta, 0.5, g) for _ in range(400)]).mean(0)
    assert (mean - delta).abs().max() < 0.25


def test_random_drop_reproducible_and_pure():
    delta = torch.randn(1000, generator=gen(9))
    before = delta.clone()
    a = sp.random_drop(delta, 0.5, gen(10))
    assert torch.equal(a, sp.random_drop(delta, 0.5, gen(10)))
    assert not torch.equal(a, sp.random_drop(delta, 0.5, gen(11)))
    assert torch.equal(delta, before)
    assert torch.equal(sp.random_drop(delta, 1.0, gen(10)), delta)


def test_random_drop_kept_fraction_matches_mergekit():
    # mergekit draws its mask with torch.bernoulli(density) from the global generator.
    delta = torch.randn(200, 300, generator=gen(12))
    torch.manual_seed(13)
    theirs = mk.bernoulli(delta, 0.35, None)
    ours = sp.random_drop(delta, 0.35, gen(13), rescale=False)
    for out in (ours, theirs):
        kept = out != 0
        assert abs(kept.float().mean().item() - 0.35) < 0.01  # sd 0.002
        assert torch.equal(out[kept], delta[kept])


# ---------------------------------------------------------------- DELLA (MAGPRUNE)

def test_magprune_probabilities_hand_computed():
    # ascending |delta| ranks in the row [3, -1, 2] are (2, 0, 1); m = 3;
    # p = (0.5 - 0.1) + 0.2 * r / 2  ->  (0.6, 0.4, 0.5)
    probs = sp.magprune_keep_probabilities(torch.tensor([3.0, -1.0, 2.0]), 0.5, 0.1)
    assert torch.allclose(probs, torch.tensor([0.6, 0.4, 0.5]))
    # rows rank independently
    rows = torch.tensor([[3.0, -1.0, 2.0], [-0.1, 0.3, 0.2]])
    probs = sp.magprune_keep_probabilities(rows, 0.5, 0.1)
    assert torch.allclose(probs, torch.tensor([[0.6, 0.4, 0.5], [0.4, 0.6, 0.5]]))
    # a single-entry row gets the mean, density
    assert torch.allclose(sp.magprune_keep_probabilities(torch.tensor([[2.0], [-1.0]]), 0.3, 0.1),
                          torch.tensor([[0.3], [0.3]]))


def test_magprune_probabilities_mean_is_density():
    probs = sp.magprune_keep_probabilities(torch.randn(7, 101, generator=gen(14)), 0.45, 0.2)
    assert torch.allclose(probs.mean(dim=1), torch.full((7,), 0.45), atol=1e-6)
    assert probs.min().item() == pytest.approx(0.25) and probs.max().item() == pytest.approx(0.65)


def test_magprune_matches_mergekit_probabilities():
    # mergekit: rank-normalised (ranks - min) / (max - min), p = (d - eps) + 2 eps * that
    delta = torch.randn(40, 50, generator=gen(15))
    ranks = delta.abs().argsort(dim=1).argsort(dim=1).float()
    expected = (0.5 - 0.15) + ranks / 49 * 0.3
    assert torch.allclose(sp.magprune_keep_probabilities(delta, 0.5, 0.15), expected, atol=1e-6)


def test_magprune_keep_frequency_follows_rank_like_mergekit():
    # Per position keep frequency over S draws: sd <= sqrt(0.25 / S) = 0.0125 for S = 1600.
    row = torch.tensor([[0.1, -5.0, 0.3, 2.0, -0.2, 1.0, 4.0, -0.05, 0.7, 3.0]])
    probs = sp.magprune_keep_probabilities(row, 0.5, 0.3)  # from 0.2 to 0.8
    g = gen(16)
    ours = torch.stack([sp.magprune(row, 0.5, 0.3, g, rescale=False) != 0
                        for _ in range(1600)]).float().mean(0)
    torch.manual_seed(16)
    theirs = torch.stack([mk.della_magprune(row, 0.5, 0.3, None) != 0
                          for _ in range(1600)]).float().mean(0)
    assert (ours - probs).abs().max() < 0.06
    assert (theirs - probs).abs().max() < 0.06
    assert (ours - theirs).abs().max() < 0.07


def test_magprune_rescale_is_one_over_p_and_unbiased():
    delta = torch.tensor([0.1, -5.0, 0.3, 2.0, -0.2, 1.0, 4.0, -0.05])
    probs = sp.magprune_keep_probabilities(delta, 0.4, 0.2)
    g = gen(17)
    draws = torch.stack([sp.magprune(delta, 0.4, 0.2, g) for _ in range(2000)])
    kept = draws != 0
    # DELLA: survivors scaled by 1 / (1 - p_drop) = 1 / p_keep, exactly
    assert torch.allclose(draws[kept], (delta / probs).expand_as(draws)[kept], rtol=1e-6)
    # E = p * delta / p = delta; sd of the mean = |delta| sqrt((1-p)/p) / sqrt(2000)
    sd = delta.abs() * ((1 - probs) / probs).sqrt() / math.sqrt(2000)
    assert ((draws.mean(0) - delta).abs() <= 5 * sd).all()


def test_magprune_zero_probability_stays_finite():
    delta = torch.randn(5, 20, generator=gen(18))
    out = sp.magprune(delta, 0.2, 0.2, gen(19))  # the smallest entry of each row has p = 0
    assert torch.isfinite(out).all()
    smallest = delta.abs().argmin(dim=1)
    assert (out[torch.arange(5), smallest] == 0).all()


def test_magprune_bounds():
    assert sp.magprune_bounds_problem(0.5, 0.5) is None
    assert sp.magprune_bounds_problem(1.0, 0.3) is None  # density 1 never samples
    problem = sp.magprune_bounds_problem(0.1, 0.15)
    assert "density = 0.1" in problem and "epsilon = 0.15" in problem and "at most 0.1" in problem
    assert "at most 0.2" in sp.magprune_bounds_problem(0.8, 0.3)
    with pytest.raises(ValueError, match="epsilon"):
        sp.magprune_keep_probabilities(torch.ones(4), 0.9, 0.2)
