"""Learning-curve plots: eval figures against compute, per method the mean over seeds with markers at its eval
points and a band showing the same 95% t interval as the report's tables, the base model as a star, the
thresholds as dashed lines, and the Pareto front over learning curves (the upper envelope of every method's eval
points) as a black staircase whose legend names the methods on it. Every method has its own colour (and a marker
and line style, so the plots read in greyscale)."""
from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib
import numpy as np

from bench.core.lazy import lazy_module

matplotlib.use("Agg")  # before pyplot loads (at its first use)
plt = lazy_module("matplotlib.pyplot")
pd = lazy_module("pandas")
sns = lazy_module("seaborn")

from bench.runner import store  # noqa: E402
from bench.runner.grid import BASE_CELL  # noqa: E402
from bench.reporting.stats import curve_envelope, mean_ci  # noqa: E402

MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">"]
LINESTYLES = ["-", "--", "-.", ":"]
X_LABELS = {"device_hours": "device-hours (training only; noisy on a shared CPU)",
            "nfe": "model evaluations (NFE-equivalents)"}


def method_colours(n: int) -> list:
    """n distinct colours: the colour-blind palette up to 10 methods, then evenly spaced hues."""
    return sns.color_palette("colorblind", n) if n <= 10 else sns.color_palette("husl", n)


def method_styles(methods: list[str]) -> dict[str, dict]:
    """Colour, marker and line style per method; the line style cycles with another period than the markers."""
    colours = method_colours(len(methods))
    return {m: {"color": colours[i], "marker": MARKERS[i % len(MARKERS)],
                "linestyle": LINESTYLES[(i // len(MARKERS) + i) % len(LINESTYLES)]} for i, m in enumerate(methods)}


def method_curves(df: pd.DataFrame, x: str, y: str) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """Per method, one (x, y) eval curve per run that has eval rows."""
    out: dict[str, list] = {}
    if y not in df:  # a world without this metric (sd3 has no held-out judge), or no cell reached an eval
        return out
    runs = df[(df.cell != BASE_CELL) & df[y].notna()]
    for (method, _cell), g in runs.groupby(["method", "cell"], sort=True):
        g = g.sort_values("iteration")
        out.setdefault(method, []).append((g[x].to_numpy(float), g[y].to_numpy(float)))
    return out


def mean_curve(curves: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x, mean, low, high) over seeds at the eval points of the runs (their union, up to where the shortest run
    ends, each run interpolated there), low/high the 95% t interval of the mean."""
    end = min(c[0][-1] for c in curves)
    xs = np.unique(np.concatenate([c[0][c[0] <= end] for c in curves]))
    ys = np.stack([np.interp(xs, cx, cy) for cx, cy in curves])
    stats = np.array([mean_ci(ys[:, j]) for j in range(len(xs))])
    return xs, stats[:, 0], stats[:, 1], stats[:, 2]


def mean_curves(df: pd.DataFrame, x: str, y: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per method: its mean curve over seeds at its eval points after compute 0 (what the envelope is taken over;
    at compute 0 every method is the base model)."""
    out = {}
    for m, c in method_curves(df, x, y).items():
        gx, gy = mean_curve(c)[:2]
        out[m] = (gx[gx > 0], gy[gx > 0])
    return out


def _panel(ax, df: pd.DataFrame, x: str, y: str, style: dict[str, dict], thresholds: list[float]) -> list[str]:
    """Draw one metric against one compute axis; returns the methods on its envelope."""
    for method, curves in sorted(method_curves(df, x, y).items()):
        st = style[method]
        gx, m, lo, hi = mean_curve(curves)
        ax.plot(gx, m, color=st["color"], marker=st["marker"], linestyle=st["linestyle"], markersize=4,
                linewidth=1.6, label=f"{method} (n={len(curves)})")
        if len(curves) > 1:
            ax.fill_between(gx, lo, hi, color=st["color"], alpha=0.15, linewidth=0)
    front = curve_envelope(mean_curves(df, x, y))
    on_front = list(dict.fromkeys(name for *_, name in front))
    if front:
        fx, fy, _ = zip(*front)
        ax.step(fx, fy, where="post", color="black", linewidth=1.0, linestyle=(0, (2, 1.5)),
                label=textwrap.fill("Pareto front over the curves: " + ", ".join(on_front), 70))
    for t in thresholds:
        ax.axhline(t, color="grey", linewidth=0.7, linestyle="--")
    base = df[df.cell == BASE_CELL]
    if len(base) and y in base and base[y].notna().any():
        ax.plot([0], [base[y].iloc[0]], marker="*", color="black", markersize=14, linestyle="none", label="base model")
    ax.set_xlabel(X_LABELS.get(x, x))
    ax.set_ylabel(y.replace("eval_", "eval ").replace("_", " "))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best", framealpha=0.85)
    return on_front


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    with store.atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, dpi=110, format="png", bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def _styles(df: pd.DataFrame) -> dict[str, dict]:
    return method_styles(sorted(df[df.cell != BASE_CELL].method.dropna().unique()))


def headline_plot(df: pd.DataFrame, metric: str, thresholds: list[float], path: Path, title: str = "") -> Path:
    """The report's first plot: the report metric against NFE, with the thresholds the summary speaks of."""
    fig, ax = plt.subplots(figsize=(13, 5.2))
    _panel(ax, df, "nfe", metric, _styles(df), thresholds)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), framealpha=0.9)
    ax.set_title(f"{title}: mean over seeds, markers at eval points, band 95% t interval, dashed: thresholds",
                 fontsize=10)
    return _save(fig, path)


def pareto_plot(df: pd.DataFrame, x: str, path: Path, metrics=("eval_reward", "eval_heldout_accuracy"),
                title: str = "") -> Path:
    """One panel per metric against compute axis x, with the envelope of the learning curves."""
    metrics = [m for m in metrics if m in df and df[m].notna().any()] or ["eval_reward"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(6.2 * len(metrics), 4.8), squeeze=False)
    style = _styles(df)
    for ax, y in zip(axes[0], metrics):
        _panel(ax, df, x, y, style, [])
    note = "  DEVICE-HOURS ON A SHARED CPU ARE NOISY: compare NFE" if x == "device_hours" else ""
    fig.suptitle(f"{title}  (mean over seeds; band: 95% t interval; staircase: front over the curves){note}",
                 fontsize=10)
    return _save(fig, path)
