"""Coverage of the report's intervals, measured by simulation (issue 11: 3-seed percentile-bootstrap intervals
covered the 10-seed mean 70-83% of the time). Populations with a known mean: a normal one, and a right-skewed one
like compute-to-threshold (lognormal, sigma 0.5). 400 samples of n seeds each; the binomial standard error of a
coverage near 0.95 is about 0.011 at 400 trials, near 0.75 about 0.022.

Measured (seed 0, 400 trials): n=3: percentile 0.76 / t 0.95 (normal), 0.70 / 0.93 (lognormal); n=5: percentile
0.84 / t 0.94 (normal), 0.80 / 0.90 (lognormal); the paired log-ratio t interval of a speed-up 0.95 at n=3.
"""
from __future__ import annotations

import numpy as np
import pytest

from bench.reporting.stats import bootstrap_ci, mean_ci, paired_ratio_ci

TRIALS = 400


def coverage(draw, n: int, interval, truth: float, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(TRIALS):
        _, lo, hi = interval(draw(rng, n))
        hits += lo <= truth <= hi
    return hits / TRIALS


POPULATIONS = {
    "normal": (lambda rng, n: rng.normal(0.5, 0.1, n), 0.5),
    "lognormal": (lambda rng, n: rng.lognormal(0.0, 0.5, n), float(np.exp(0.125))),
}


@pytest.mark.parametrize("population", list(POPULATIONS))
def test_percentile_bootstrap_undercovers_and_t_does_not(population: str) -> None:
    draw, truth = POPULATIONS[population]
    pct = {n: coverage(draw, n, lambda v: bootstrap_ci(v, n_resamples=400), truth) for n in (3, 5)}
    t = {n: coverage(draw, n, mean_ci, truth) for n in (3, 5)}
    # n=3: a percentile interval cannot leave the sample's range, so it covers at most 1 - 2/8 of the time for a
    # symmetric population; the t interval is exact for a normal one.
    assert pct[3] < 0.8 and pct[5] < 0.9
    assert t[3] >= (0.93 if population == "normal" else 0.89)
    assert t[5] >= (0.93 if population == "normal" else 0.89)


def test_paired_ratio_interval_covers_the_true_ratio() -> None:
    # Per-seed speed-ups exp(N(log 3, 0.3)): the geometric-mean ratio is 3.
    draw = lambda rng, n: np.exp(rng.normal(np.log(3.0), 0.3, n))  # noqa: E731
    cov = coverage(draw, 3, lambda v: paired_ratio_ci(v, np.ones(len(v))), 3.0)
    assert cov >= 0.93
