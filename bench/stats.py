"""Statistics over seeds: bootstrap confidence intervals and compute-to-threshold."""
from __future__ import annotations

import numpy as np
from scipy import stats as sps


def bootstrap_ci(values, confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): percentile bootstrap of the mean over seeds; one seed gives a zero-width interval."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    if len(v) == 0:
        return (float("nan"),) * 3
    if np.all(v == v[0]):  # one seed, or identical seeds: no spread to resample
        return (float(v[0]),) * 3
    res = sps.bootstrap((v,), np.mean, confidence_level=confidence, n_resamples=n_resamples, method="percentile",
                        random_state=np.random.default_rng(seed))
    return float(v.mean()), float(res.confidence_interval.low), float(res.confidence_interval.high)


def compute_to_threshold(x, y, threshold: float) -> float:
    """The compute x at which the curve y first reaches threshold, linearly interpolated; nan if never."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    hits = np.nonzero(y >= threshold)[0]
    if len(hits) == 0:
        return float("nan")
    i = hits[0]
    if i == 0:
        return float(x[0])
    frac = (threshold - y[i - 1]) / (y[i] - y[i - 1])
    return float(x[i - 1] + frac * (x[i] - x[i - 1]))


def interpolate_curves(curves: list[tuple[np.ndarray, np.ndarray]], points: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """Resample seed curves onto a shared x grid up to the shortest run: (x, [seeds, points])."""
    x_max = min(c[0][-1] for c in curves)
    grid = np.linspace(0, x_max, points)
    return grid, np.stack([np.interp(grid, cx, cy) for cx, cy in curves])
