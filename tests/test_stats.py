"""Interval estimates, censored compute to threshold, learning-curve AUC and the Pareto front over learning curves,
against numbers worked out by hand (t quantiles from scipy's t distribution, an independent implementation)."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from bench.reporting.spread import factor_spread
from bench.reporting.stats import (censored_time, curve_envelope, interval_coverage, learning_curve_auc, mean_ci,
                         paired_ratio_ci, ratio_ci)


def test_mean_ci_is_student_t() -> None:
    # [1, 2, 3]: mean 2, s = 1, half-width t_{0.975, 2} / sqrt(3) = 4.302653 / 1.732051 = 2.484138.
    m, lo, hi = mean_ci([1.0, 2.0, 3.0])
    assert m == 2.0 and hi - m == pytest.approx(2.484138, abs=1e-6) and m - lo == pytest.approx(2.484138, abs=1e-6)
    assert mean_ci([0.7]) == (0.7, 0.7, 0.7) and mean_ci([0.5, 0.5]) == (0.5, 0.5, 0.5)
    assert all(math.isnan(v) for v in mean_ci([]))


def test_ratio_intervals() -> None:
    # Paired: per-seed ratios 2, 2, 2 -> exactly 2 with no width; 1, 2, 4 -> geometric mean 2, and on the log
    # scale mean log 2 with s = log 2, so the interval is 2 * exp(+-4.302653 * log2 / sqrt 3).
    assert paired_ratio_ci([2, 4, 6], [1, 2, 3]) == (2.0, 2.0, 2.0)
    r, lo, hi = paired_ratio_ci([1, 2, 4], [1, 1, 1])
    half = 4.302653 * math.log(2) / math.sqrt(3)
    assert r == pytest.approx(2.0) and lo == pytest.approx(2 * math.exp(-half)) and hi == pytest.approx(2 * math.exp(half))
    # Unpaired: mean 10 over mean 5 = 2; delta-method variance (1/(3*100) + 1/(3*25)) with Welch's df.
    r, lo, hi = ratio_ci([9, 10, 11], [4, 5, 6])
    va, vb = 1 / 300, 1 / 75
    df = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 2)
    h = sps.t.ppf(0.975, df) * math.sqrt(va + vb)
    assert r == 2.0 and lo == pytest.approx(2 * math.exp(-h)) and hi == pytest.approx(2 * math.exp(h))


def test_censored_time_and_auc() -> None:
    assert censored_time([0, 10, 20], [0.1, 0.5, 0.9], 0.7, cap=30) == (15.0, True)
    assert censored_time([0, 10], [0.1, 0.2], 0.5, cap=30) == (30.0, False)  # never reached: counted at the cap
    # A diverged run that stopped at 10 counts at the cap too, not at where it stopped.
    assert censored_time([0, 10], [0.1, 0.3], 0.5, cap=100) == (100.0, False)
    # Trapezoid of [0.2 -> 0.6 over 0..10, then 0.6 held to the cap 20] / 20 = (4 + 6) / 20.
    assert learning_curve_auc([0, 10], [0.2, 0.6], cap=20) == pytest.approx(0.5)
    assert learning_curve_auc([0, 10, 20], [0.2, 0.6, 1.0], cap=20) == pytest.approx((4 + 8) / 20)


def test_curve_envelope_spans_every_eval_point() -> None:
    # A is best early, B overtakes at 30; C never leads. Final-point Pareto would rank only B's end.
    curves = {"A": ([10, 20, 30], [0.5, 0.6, 0.62]), "B": ([10, 20, 30, 40], [0.2, 0.4, 0.7, 0.9]),
              "C": ([10, 20], [0.1, 0.55])}
    assert curve_envelope(curves) == [(10, 0.5, "A"), (20, 0.6, "A"), (30, 0.7, "B"), (40, 0.9, "B")]


def test_identical_cells_have_zero_spread_and_points_lie_inside() -> None:
    # objective p and q bit-identical seed for seed: the paired bootstrap must give exactly 0 [0, 0] (issue 11's
    # "0.000 [0.002, 0.043]" came from resampling the twins independently).
    rng = np.random.default_rng(0)
    rows = []
    for est, shift in (("a", 0.9), ("b", 0.5)):
        for seed in range(3):
            v = shift + rng.normal(0, 0.05)
            rows += [{"x": est, "y": obj, "seed": seed, "value": v} for obj in ("p", "q")]
    res = factor_spread(pd.DataFrame(rows), "x", "y")
    assert tuple(res["point"][1:2]) == (0.0,) and res["lo"][1] == 0.0 and res["hi"][1] == 0.0
    assert np.all(res["lo"] <= res["point"]) and np.all(res["point"] <= res["hi"])


def test_interval_coverage_enumerates_subsets() -> None:
    # Pool 0..9 (mean 4.5); the subset's range covering 4.5 <=> it holds values on both sides: 1 - 2 C(5,3)/C(10,3).
    cov, n = interval_coverage(np.arange(10.0), 3, lambda v: (v.mean(), v.min(), v.max()))
    assert n == 120 and cov == pytest.approx(1 - 2 * 10 / 120)
