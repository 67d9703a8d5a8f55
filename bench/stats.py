"""Statistics over seeds: bootstrap confidence intervals, IQM, probability of improvement, compute-to-threshold
and Pareto fronts.

Interval estimates follow rliable (Agarwal et al. 2021, "Deep RL at the edge of the statistical precipice"):
stratified percentile bootstrap (runs resampled within each task, here each grid), the interquartile mean (IQM)
next to the mean, and the probability of improvement P(X > Y). They are computed with scipy's bootstrap, not
rliable itself: rliable 1.2 pulls in arch + statsmodels (~76 MB) and its interval estimates fail with arch 7.2
(`TypeError: ... random_state ... NoneType`), the version pip resolves next to numpy 2.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy import stats as sps

Aggregate = Callable[..., np.ndarray]


def _finite(values) -> np.ndarray:
    return np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=float)


def iqm(values, axis: int = -1) -> np.ndarray | float:
    """Interquartile mean: the mean of the middle 50% of the values (robust to an outlier seed, less noisy than
    the median); with fewer than 4 values nothing is trimmed and it equals the mean."""
    return sps.trim_mean(np.asarray(values, dtype=float), 0.25, axis=axis)


def _pooled(statistic: str) -> Aggregate:
    """An aggregate over the runs of all strata pooled (rliable's convention), vectorized over leading axes."""
    if statistic not in ("mean", "iqm"):
        raise ValueError(f"unknown statistic '{statistic}'; valid: iqm, mean")
    fn = np.mean if statistic == "mean" else iqm

    def agg(*strata: np.ndarray, axis: int = -1) -> np.ndarray:
        return fn(np.concatenate(strata, axis=axis), axis=axis)

    return agg


def stratified_bootstrap_ci(strata: Sequence, statistic: str | Aggregate = "mean", confidence: float = 0.95,
                            n_resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """(point, low, high) of an aggregate over several strata (tasks, grids) of per-seed values; each stratum
    is resampled with replacement on its own (stratified percentile bootstrap). `statistic` is "mean", "iqm" or
    a function of the strata (numpy arrays, with an `axis` keyword) returning one number per resample."""
    data = [_finite(s) for s in strata]
    data = [d for d in data if len(d)]
    if not data:
        return (float("nan"),) * 3
    agg = _pooled(statistic) if isinstance(statistic, str) else statistic
    point = float(agg(*data))
    varying = [i for i, d in enumerate(data) if len(d) > 1 and not np.all(d == d[0])]
    if not varying:  # one seed per stratum, or identical seeds: nothing to resample
        return (point,) * 3

    def resampled(*moving: np.ndarray, axis: int = -1) -> np.ndarray:
        # Strata without spread are constants; scipy resamples only the others (it needs >= 2 values each).
        full = [np.broadcast_to(d, moving[0].shape[:-1] + d.shape) for d in data]
        for i, m in zip(varying, moving):
            full[i] = m
        return agg(*full, axis=axis)

    res = sps.bootstrap([data[i] for i in varying], resampled, confidence_level=confidence, n_resamples=n_resamples,
                        method="percentile", vectorized=True, paired=False, random_state=np.random.default_rng(seed))
    lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return point, min(lo, point), max(hi, point)


def bootstrap_ci(values, confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0,
                 statistic: str = "mean") -> tuple[float, float, float]:
    """(mean or IQM, low, high): percentile bootstrap over seeds; one seed gives a zero-width interval."""
    return stratified_bootstrap_ci([values], statistic, confidence, n_resamples, seed)


def _prob_improvement(*xy: np.ndarray, axis: int = -1) -> np.ndarray:
    """Mean over tasks of P(X > Y) (ties count 1/2): the Mann-Whitney statistic of each task's runs, normalised."""
    per_task = []
    for x, y in zip(xy[0::2], xy[1::2]):
        gt = (np.expand_dims(x, -1) > np.expand_dims(y, -2)).mean(axis=(-2, -1))
        eq = (np.expand_dims(x, -1) == np.expand_dims(y, -2)).mean(axis=(-2, -1))
        per_task.append(gt + 0.5 * eq)
    return np.mean(per_task, axis=0)


def probability_of_improvement(x_strata: Sequence, y_strata: Sequence, confidence: float = 0.95,
                               n_resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """(P(X > Y), low, high): the probability that a run of method X beats a run of method Y on the same task,
    averaged over tasks (strata), with a stratified bootstrap CI; 0.5 means no difference."""
    pairs = [(_finite(x), _finite(y)) for x, y in zip(x_strata, y_strata)]
    pairs = [(x, y) for x, y in pairs if len(x) and len(y)]
    if not pairs:
        return (float("nan"),) * 3
    return stratified_bootstrap_ci([v for pair in pairs for v in pair], _prob_improvement, confidence, n_resamples, seed)


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """The names whose (cost, value) no other point dominates (cost no higher and value no lower, one strictly):
    lower compute and higher reward are better. Points with a nan are never on the front. Sorted by cost."""
    ok = {k: (float(c), float(v)) for k, (c, v) in points.items() if np.isfinite(c) and np.isfinite(v)}
    front = [k for k, (c, v) in ok.items()
             if not any(c2 <= c and v2 >= v and (c2 < c or v2 > v) for k2, (c2, v2) in ok.items() if k2 != k)]
    return sorted(front, key=lambda k: ok[k])


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
