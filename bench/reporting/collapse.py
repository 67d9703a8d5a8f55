"""Collapse and reward-hacking signs per seed: each run is checked against its own peak and against the real data's
values its world declares (bench/worlds/detectors.py), with no requirement that the reward rose (a collapse to chance
lowers the reward too)."""
from __future__ import annotations

import numpy as np

from bench.core.lazy import lazy_module
from bench.worlds.detectors import Detector

pd = lazy_module("pandas")


def _name(metric: str) -> str:
    return metric.removeprefix("eval_").replace("_", " ")


def fell_from_peak(x: np.ndarray, y: np.ndarray, metric: str) -> str | None:
    """A run that lost more than half of its gain over its first eval, from its own peak to its last eval."""
    if len(y) < 2:
        return None
    start, final = float(y[0]), float(y[-1])
    i = int(np.argmax(y))
    peak = float(y[i])
    gain = peak - start
    if gain > 0 and peak - final > 0.5 * gain:
        return (f"{_name(metric)} fell from its peak {peak:.2f} (at {x[i]:.3g} compute) to "
                f"{final:.2f}, losing {100 * (peak - final) / gain:.0f}% of its gain over the start ({start:.2f})")
    return None


def detector_sign(det: Detector, curve: pd.DataFrame) -> str | None:
    """The sign one detector raises on one run's eval curve (sorted by compute), or None."""
    if det.metric not in curve or not curve[det.metric].notna().any():
        return None
    y = curve[det.metric].to_numpy(float)
    ok = np.isfinite(y)
    final = float(y[ok][-1])
    if det.kind == "floor":
        limit = det.factor * det.reference
        if final < limit:
            return (f"{det.label}: {_name(det.metric)} {final:.2f} < {det.factor:g} x the real data's "
                    f"{det.reference:.2f}")
        return None
    if det.kind == "ceiling":
        best = float(np.nanmin(y))
        if final > det.factor * det.reference and final - best > det.rise:
            return (f"{det.label}: {_name(det.metric)} {final:.2f} (real data {det.reference:.2f}; "
                    f"this run's own best {best:.2f})")
        return None
    if det.partner not in curve:
        return None
    gap = (curve[det.metric] - curve[det.partner]).to_numpy(float)
    gap = gap[np.isfinite(gap)]
    if len(gap) and gap[-1] - gap[0] > det.rise:
        return (f"{det.label}: {_name(det.metric)} minus {_name(det.partner)} grew from "
                f"{gap[0]:+.2f} to {gap[-1]:+.2f}")
    return None


def seed_signs(curve: pd.DataFrame, metric: str, detectors: list[Detector], x: str = "nfe") -> list[str]:
    """Every sign one run raises: the peak check on the report metric, then each of the world's detectors."""
    curve = curve.sort_values(x)
    signs = []
    if metric in curve and curve[metric].notna().sum() >= 2:
        g = curve[curve[metric].notna()]
        sign = fell_from_peak(g[x].to_numpy(float), g[metric].to_numpy(float), metric)
        if sign:
            signs.append(sign)
    signs += [s for s in (detector_sign(d, curve) for d in detectors) if s]
    return signs
