"""Percentile bootstrap intervals for the rates the benchmarks report.

``stratified_bootstrap(groups)``: the statistic is the unweighted mean of the groups' means (the IF
benchmark's AVG: the mean of the task rates; one group = a plain accuracy). Each resample draws every
group's values with replacement within the group, so each task keeps its number of prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class Interval:
    value: float      # the statistic on the data itself
    low: float
    high: float
    level: float
    resamples: int

    def pct(self) -> str:
        """``"44.1 [39.0, 49.3]"`` (values as percentages)."""
        return f"{100 * self.value:.1f} [{100 * self.low:.1f}, {100 * self.high:.1f}]"

    def signed_points(self) -> str:
        """``"+3.2 [0.8, 6.0]"``: a difference of two rates, in points."""
        return f"{100 * self.value:+.1f} [{100 * self.low:.1f}, {100 * self.high:.1f}]"


def stratified_bootstrap(groups: Sequence[Sequence[float]], resamples: int = 2000, level: float = 0.95,
                         seed: int = 0) -> Interval:
    """Mean of the group means with its ``level`` percentile bootstrap interval (seeded, reproducible)."""
    import numpy as np

    groups = [np.asarray(g, dtype=np.float64) for g in groups]
    if not groups or any(g.size == 0 for g in groups):
        raise ValueError("bootstrap: every group needs at least one value")
    if not 0 < level < 1 or resamples < 1:
        raise ValueError(f"bootstrap: level must be in (0, 1) and resamples >= 1, got {level}, {resamples}")
    rng = np.random.default_rng(seed)
    stats = np.zeros(resamples)
    for g in groups:
        picks = rng.integers(0, g.size, size=(resamples, g.size))
        stats += g[picks].mean(axis=1)
    stats /= len(groups)
    value = float(np.mean([g.mean() for g in groups]))
    tail = (1 - level) / 2
    low, high = np.quantile(stats, [tail, 1 - tail])
    return Interval(value, float(low), float(high), level, resamples)
