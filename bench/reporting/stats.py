"""Statistics over seeds: confidence intervals, IQM, probability of improvement, compute-to-threshold (with
censoring), speed-up ratios, area under the learning curve and Pareto fronts over learning curves.

Means over seeds get Student-t intervals (`mean_ci`) and speed-ups t intervals on the log scale (`ratio_ci`,
`paired_ratio_ci`): with 3-5 seeds a percentile bootstrap cannot reach beyond the sample's range and undercovers
(for n=3 at most 1 - 2 / 2^3 = 75% for a symmetric population); `interval_coverage` measures this, and
tests/test_stats_coverage.py states the numbers.

Interval estimates follow rliable (Agarwal et al. 2021, "Deep RL at the edge of the statistical precipice"):
stratified percentile bootstrap (runs resampled within each task, here each grid), the interquartile mean (IQM)
next to the mean, and the probability of improvement P(X > Y). They are computed with scipy's bootstrap, not
rliable itself: rliable 1.2 pulls in arch + statsmodels (~76 MB) and its interval estimates fail with arch 7.2
(`TypeError: ... random_state ... NoneType`), the version pip resolves next to numpy 2.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import combinations
from math import comb

import numpy as np

from bench.core.lazy import lazy_module

sps = lazy_module("scipy.stats")  # 1.4 s of imports; planning a grid reads learning_curve_auc, never sps

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


def mean_ci(values, confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): Student-t interval over seeds, mean +- t_{n-1} s / sqrt(n); one seed (or identical seeds)
    gives a zero-width interval, none gives nans."""
    v = _finite(values)
    if not len(v):
        return (float("nan"),) * 3
    m = float(v.mean())
    if len(v) < 2:
        return m, m, m
    half = float(sps.t.ppf(0.5 + confidence / 2, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))
    return m, m - half, m + half


def ratio_ci(numerator, denominator, confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean(numerator) / mean(denominator), low, high) for two independent groups of positive per-seed values:
    a t interval on the log of the ratio, its variance by the delta method (s^2 / (n mean^2) per group) and its
    degrees of freedom by Welch-Satterthwaite. A group of one seed contributes no variance."""
    a, b = _finite(numerator), _finite(denominator)
    if not len(a) or not len(b) or a.mean() <= 0 or b.mean() <= 0:
        return (float("nan"),) * 3
    r = float(a.mean() / b.mean())
    parts = [g.var(ddof=1) / (len(g) * g.mean() ** 2) for g in (a, b) if len(g) > 1]
    dfs = [len(g) - 1 for g in (a, b) if len(g) > 1]
    var = float(sum(parts))
    if var <= 0:
        return r, r, r
    df = var ** 2 / sum(p ** 2 / d for p, d in zip(parts, dfs) if p > 0)
    half = float(sps.t.ppf(0.5 + confidence / 2, df) * np.sqrt(var))
    return r, r * float(np.exp(-half)), r * float(np.exp(half))


def paired_ratio_ci(numerator, denominator, confidence: float = 0.95) -> tuple[float, float, float]:
    """(geometric mean of numerator_i / denominator_i, low, high) over paired positive values (the same seed, or
    the same seed and stratum): a t interval of the mean log-ratio."""
    a, b = np.asarray(numerator, float), np.asarray(denominator, float)
    ok = np.isfinite(a) & np.isfinite(b) & (a > 0) & (b > 0)
    if not ok.any():
        return (float("nan"),) * 3
    m, lo, hi = mean_ci(np.log(a[ok] / b[ok]), confidence)
    return float(np.exp(m)), float(np.exp(lo)), float(np.exp(hi))


def censored_time(x, y, threshold: float, cap: float) -> tuple[float, bool]:
    """(compute at which the curve first reaches threshold, True), or (cap, False) for a run that never did: a
    run that stopped early (diverged, failed) or ran out of budget counts as needing at least the whole budget,
    never as missing."""
    t = compute_to_threshold(x, y, threshold)
    return (t, True) if np.isfinite(t) and t <= cap else (float(cap), False)


def learning_curve_auc(x, y, cap: float) -> float:
    """Area under the eval curve over compute [0, cap], divided by cap (the curve's mean level over the budget;
    speed and level in one number). A run that stopped before the cap keeps its last value to the cap."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if not len(x) or not cap > 0:
        return float("nan")
    order = np.argsort(x, kind="stable")
    x, y = x[order], y[order]
    keep = x <= cap
    x, y = x[keep], y[keep]
    if not len(x):
        return float("nan")
    if x[-1] < cap:
        x, y = np.append(x, cap), np.append(y, y[-1])
    if x[0] > 0:  # before the first eval point: its value (the first eval is at compute 0 in practice)
        x, y = np.insert(x, 0, 0.0), np.insert(y, 0, y[0])
    return float(np.trapezoid(y, x) / cap)


def curve_envelope(curves: dict[str, tuple[np.ndarray, np.ndarray]]) -> list[tuple[float, float, str]]:
    """The Pareto front over learning curves: of every eval point (compute, value) of every method's curve, those
    no other point dominates (compute no higher and value no lower, one strictly), sorted by compute, each with
    the method it belongs to: the best value reachable at each compute, and who reaches it."""
    pts = [(float(x), float(y), name) for name, (xs, ys) in curves.items()
           for x, y in zip(np.asarray(xs, float), np.asarray(ys, float)) if np.isfinite(x) and np.isfinite(y)]
    pts.sort(key=lambda p: (p[0], -p[1], p[2]))
    front, best = [], -np.inf
    for x, y, name in pts:
        if y > best:
            front.append((x, y, name))
            best = y
    return front


def interval_coverage(pool, n: int, interval: Callable[[np.ndarray], tuple[float, float, float]],
                      max_subsets: int = 2000, seed: int = 0) -> tuple[float, int]:
    """(fraction of n-seed subsets of `pool` whose interval covers the mean of the whole pool, subsets tried):
    every subset when there are at most max_subsets of them, else that many drawn at random. The pool's mean
    stands in for the population mean, so with a pool of 10 this slightly overstates coverage."""
    pool = _finite(pool)
    truth = pool.mean()
    if comb(len(pool), n) <= max_subsets:
        subsets = [np.asarray(c) for c in combinations(range(len(pool)), n)]
    else:
        rng = np.random.default_rng(seed)
        subsets = [rng.choice(len(pool), n, replace=False) for _ in range(max_subsets)]
    hits = [lo <= truth <= hi for _, lo, hi in (interval(pool[s]) for s in subsets)]
    return float(np.mean(hits)), len(subsets)
