"""Compute-to-threshold at several thresholds, with speed-ups over the baseline (lower bounds when it never got there)."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from bench.grid import BASE_CELL
from bench.stats import bootstrap_ci, compute_to_threshold


def reach_table(df: pd.DataFrame, metric: str, thresholds: list[float]) -> pd.DataFrame:
    """One row per (run, threshold): NFE at which the run's eval curve first reaches it (nan if never) and its final NFE."""
    rows = []
    runs = df[(df.cell != BASE_CELL) & df[metric].notna()]
    for cell, g in runs.groupby("cell"):
        g = g.sort_values("iteration")
        for thr in thresholds:
            rows.append({"method": g.method.iloc[0], "cell": cell, "threshold": thr, "final_nfe": g.nfe.iloc[-1],
                         "nfe": compute_to_threshold(g.nfe, g[metric], thr)})
    return pd.DataFrame(rows)


def speedup_text(method: pd.DataFrame, base: pd.DataFrame) -> str:
    """baseline NFE / method NFE; a lower bound '>= x' when some baseline run never reached the threshold."""
    if method.nfe.isna().any():
        return "n/a (method did not always reach it)"
    m = method.nfe.mean()
    if base.nfe.notna().all():
        return f"{base.nfe.mean() / m:.2f}x"
    # Runs that never reached it would have needed more than their whole budget.
    bound = np.where(base.nfe.isna(), base.final_nfe, base.nfe).mean() / m
    return f">= {bound:.2f}x (baseline reached it in {int(base.nfe.notna().sum())}/{len(base)} runs)"


def thresholds_section(df: pd.DataFrame, grid_cfg: dict, baseline: str | None) -> list[str]:
    report = grid_cfg.get("report", {}) or {}
    metric = report.get("metric", "eval_reward")
    thresholds = [float(t) for t in (report.get("thresholds") or [])]
    if not thresholds or metric not in df:
        return []
    table = reach_table(df, metric, thresholds)
    if not len(table):
        return []
    out = ["", f"## Compute to reach {metric} thresholds", "",
           "Mean NFE over the runs that reached the threshold [95% bootstrap CI] (runs reached / runs), and the "
           "speed-up over the baseline (baseline NFE / method NFE).", "",
           "| method | " + " | ".join(f"NFE to {t:g}" for t in thresholds) + " | "
           + " | ".join(f"speed-up at {t:g}" for t in thresholds) + " |",
           "|---" * (1 + 2 * len(thresholds)) + "|"]
    for method, g in table.groupby("method", sort=True):
        cells, speed = [], []
        for t in thresholds:
            gt = g[g.threshold == t]
            mean, lo, hi = bootstrap_ci(gt.nfe.to_numpy(float))
            reached = f"({int(gt.nfe.notna().sum())}/{len(gt)})"
            cells.append(f"{mean:.0f} [{lo:.0f}, {hi:.0f}] {reached}" if math.isfinite(mean) else f"never {reached}")
            base = table[(table.method == baseline) & (table.threshold == t)] if baseline else pd.DataFrame()
            speed.append("baseline" if method == baseline else speedup_text(gt, base) if len(base) else "n/a")
        name = f"**{method}**" if method == baseline else method
        out.append(f"| {name} | " + " | ".join(cells) + " | " + " | ".join(speed) + " |")
    return out
