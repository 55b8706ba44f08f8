"""Stratified bootstrap intervals against a slow reference that redraws the same indices one by one."""

import math
import random

import numpy as np
import pytest

from focusvlm.eval.intervals import stratified_bootstrap


def slow_reference(groups, resamples, level, seed):
    """The same statistic, resample by resample and value by value (the same generator draws, in order)."""
    rng = np.random.default_rng(seed)
    draws = [rng.integers(0, len(g), size=(resamples, len(g))) for g in groups]
    stats = []
    for b in range(resamples):
        means = []
        for g, idx in zip(groups, draws):
            total = 0.0
            for i in idx[b]:
                total += g[int(i)]
            means.append(total / len(g))
        stats.append(sum(means) / len(means))
    stats.sort()
    tail = (1 - level) / 2

    def quantile(q):  # numpy's default (linear) rule, written out
        pos = q * (len(stats) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return stats[lo] + (stats[hi] - stats[lo]) * (pos - lo)

    value = sum(sum(g) / len(g) for g in groups) / len(groups)
    return value, quantile(tail), quantile(1 - tail)


@pytest.mark.parametrize("seed", [0, 3])
def test_matches_the_slow_reference(seed):
    rng = random.Random(seed)
    groups = [[float(rng.random() < p) for _ in range(rng.randint(3, 40))] for p in (0.1, 0.5, 0.8, 0.95)]
    got = stratified_bootstrap(groups, resamples=300, level=0.9, seed=seed)
    value, low, high = slow_reference(groups, 300, 0.9, seed)
    assert got.value == pytest.approx(value, abs=1e-12)
    assert (got.low, got.high) == (pytest.approx(low, abs=1e-12), pytest.approx(high, abs=1e-12))
    assert got.low <= got.value <= got.high


def test_value_is_the_mean_of_the_group_means_not_of_all_values():
    got = stratified_bootstrap([[1.0], [0.0, 0.0, 0.0]], resamples=50)
    assert got.value == 0.5 and got.low == got.high == 0.5  # nothing varies within a group


def test_width_of_a_large_binomial_sample_is_the_normal_approximation():
    values = [1.0] * 600 + [0.0] * 1400
    got = stratified_bootstrap([values], resamples=4000, seed=1)
    half = 1.96 * math.sqrt(0.3 * 0.7 / 2000)
    assert (got.high - got.low) / 2 == pytest.approx(half, rel=0.1)
    assert got.pct().startswith("30.0 [")


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="every group needs at least one value"):
        stratified_bootstrap([[1.0], []])
    with pytest.raises(ValueError, match="level must be in"):
        stratified_bootstrap([[1.0]], level=1.5)
