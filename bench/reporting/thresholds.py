"""Compute to reach each threshold, censored at the cap: a run that never reached a threshold (out of budget,
diverged, stopped) counts at the cap rather than being dropped, so every cell has a number; the count of runs that
reached it is printed beside it, and a mean that includes censored runs is marked as a lower bound (>=). Speed-ups
over the baseline are ratios of NFE paired by seed, with a t interval on the log scale."""
from __future__ import annotations

import numpy as np

from bench.core.lazy import lazy_module
from bench.reporting.stats import mean_ci, paired_ratio_ci, ratio_ci

pd = lazy_module("pandas")


def fmt_nfe(v: float) -> str:
    """An NFE count as 202k / 1.2M."""
    return f"{v / 1e6:.3g}M" if abs(v) >= 1e6 else f"{v / 1e3:.3g}k" if abs(v) >= 1e3 else f"{v:.0f}"


def censored_mean_text(times: np.ndarray, reached: np.ndarray, unit: str = "nfe") -> str:
    """'mean [lo, hi] (k/n)', prefixed '>=' when some runs are censored at the cap."""
    m, lo, hi = mean_ci(times)
    f = fmt_nfe if unit == "nfe" else (lambda v: f"{v:.3g}")
    bound = ">= " if not reached.all() else ""
    return f"{bound}{f(m)} [{f(lo)}, {f(hi)}] ({int(reached.sum())}/{len(reached)})"


def speedup(method: pd.DataFrame, base: pd.DataFrame, t: float, unit: str = "nfe"
            ) -> tuple[tuple[float, float, float], str]:
    """(baseline compute / method compute with its 95% CI, qualifier): paired by seed when the seeds match, else
    two independent groups. The qualifier says which way censoring biases it."""
    col, hit = f"{unit}@{t:g}", f"reached@{t:g}"
    pair = method.set_index("seed")[[col]].join(base.set_index("seed")[[col]].add_suffix("_b"), how="inner")
    if len(pair) >= 2:
        r = paired_ratio_ci(pair[f"{col}_b"].to_numpy(float), pair[col].to_numpy(float))
    else:
        r = ratio_ci(base[col].to_numpy(float), method[col].to_numpy(float))
    m_all, b_all = bool(method[hit].all()), bool(base[hit].all())
    if m_all and not b_all:
        return r, ">= "  # the baseline would have needed more than the cap
    if b_all and not m_all:
        return r, "<= "
    if not m_all and not b_all:
        return r, "~ "  # both censored: no direction
    return r, ""


def thresholds_section(runs: pd.DataFrame, metric: str, thresholds: list[float], baseline: str | None,
                       cap: float, methods: list[str], unit: str = "nfe") -> list[str]:
    """report.md lines: per method and threshold, compute to reach it and the speed-up over the baseline; unit
    "nfe" (model evaluations) or "sec" (device-seconds, censored at the longest run's device time)."""
    if not thresholds or not len(runs):
        return []
    name_of = {"nfe": "NFE", "sec": "device-seconds"}[unit]
    cap_text = f"{fmt_nfe(cap)} NFE" if unit == "nfe" else "the longest run's device-seconds"
    out = ["", f"## {name_of} to reach {metric} thresholds", "",
           f"Mean {name_of} over runs [95% t interval] (runs that reached it / runs). A run that never reached a "
           f"threshold within the budget (or diverged first) counts at the cap, {cap_text}: it is censored, not "
           f"dropped, so a mean with censored runs is a lower bound (>=). Speed-up = baseline / method {name_of}, the "
           "geometric mean of per-seed ratios with a 95% t interval (>=: only the baseline had censored runs, so the "
           "true speed-up is at least this; <=: only the method; ~: both)."
           + (" Device-seconds on a shared CPU are noisy." if unit == "sec" else ""), "",
           "| method | " + " | ".join(f"{name_of} to {t:g}" for t in thresholds) + " | "
           + " | ".join(f"speed-up at {t:g}" for t in thresholds) + " |",
           "|---" * (1 + 2 * len(thresholds)) + "|"]
    base = runs[runs.method == baseline] if baseline is not None else runs.iloc[:0]
    for method in methods:
        g = runs[runs.method == method]
        if not len(g):
            continue
        cells = [censored_mean_text(g[f"{unit}@{t:g}"].to_numpy(float), g[f"reached@{t:g}"].to_numpy(bool), unit)
                 for t in thresholds]
        speed = []
        for t in thresholds:
            if method == baseline:
                speed.append("(baseline)")
            elif not len(base):
                speed.append("no baseline")
            else:
                (r, lo, hi), q = speedup(g, base, t, unit)
                speed.append(f"{q}{r:.2f}x [{lo:.2f}, {hi:.2f}]")
        name = f"**{method}**" if method == baseline else method
        out.append(f"| {name} | " + " | ".join(cells) + " | " + " | ".join(speed) + " |")
    return out
