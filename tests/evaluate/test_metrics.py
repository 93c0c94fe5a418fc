"""Generation metrics and confidence intervals, against hand-computed values."""

import math

import numpy as np
import pytest

from mergesmith.evaluate.metrics import (bootstrap_ci, exact_match, macro_bootstrap_ci, normalize_answer, rouge_l,
                                         token_f1)


def test_normalize_and_exact_match():
    assert normalize_answer("  The  Eiffel-Tower!  ") == "eiffeltower"
    assert exact_match("the Paris.", ["paris"]) == 1.0
    assert exact_match("Paris, France", ["paris"]) == 0.0
    assert exact_match("five", ["five six", "Five"]) == 1.0  # best over references


def test_token_f1_hand_computed():
    # normalized: "big red dog" vs "red dog barked": 2 common, precision 2/3, recall 2/3
    assert token_f1("The big red dog", ["a red dog barked"]) == pytest.approx(2 / 3)
    assert token_f1("red", ["blue", "red"]) == 1.0
    assert token_f1("", [""]) == 1.0 and token_f1("x", [""]) == 0.0


def test_rouge_l_hand_computed():
    # LCS of "the cat on the mat" in "the cat sat on the mat" is 5 words: P = 5/5, R = 5/6
    assert rouge_l("the cat on the mat", ["the cat sat on the mat"]) == pytest.approx(2 * (5 / 6) / (1 + 5 / 6))
    assert rouge_l("dog", ["cat", "the dog"]) == pytest.approx(2 * 0.5 / 1.5)


def test_bootstrap_interval_matches_the_normal_approximation():
    values = np.array([1.0, 0.0] * 200)  # mean 0.5, n = 400: 95% half-width 1.96 * sqrt(.25 / 400) = 0.049
    low, high = bootstrap_ci(values, resamples=4000, seed=1)
    half = 1.96 * math.sqrt(0.25 / 400)
    assert low == pytest.approx(0.5 - half, abs=0.012) and high == pytest.approx(0.5 + half, abs=0.012)
    assert bootstrap_ci(values, resamples=4000, seed=1) == (low, high)  # seeded: reproducible


def test_macro_interval_weights_tasks_equally():
    small_perfect = np.ones(10)
    large_half = np.array([1.0, 0.0] * 200)
    low, high = macro_bootstrap_ci([small_perfect, large_half], resamples=4000, seed=0)
    # the macro mean is (1 + 0.5) / 2 = 0.75, whatever the sizes; only the large task varies
    half = 1.96 * math.sqrt(0.25 / 400) / 2
    assert low == pytest.approx(0.75 - half, abs=0.01) and high == pytest.approx(0.75 + half, abs=0.01)


def test_degenerate_intervals():
    assert bootstrap_ci([1.0, 1.0, 1.0]) == (1.0, 1.0)
    assert bootstrap_ci([]) is None
    assert bootstrap_ci([1.0, 0.0], resamples=0) is None
