"""Pareto plots: eval figures against compute, one mean curve and a band over seeds per method."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from bench.grid import BASE_CELL  # noqa: E402
from bench.stats import interpolate_curves  # noqa: E402

MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">"]
X_LABELS = {"device_hours": "device-hours (training only)", "nfe": "model evaluations (NFE-equivalents)"}


def method_curves(df: pd.DataFrame, x: str, y: str) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    out: dict[str, list] = {}
    runs = df[(df.cell != BASE_CELL) & df[y].notna()]
    for (method, _cell), g in runs.groupby(["method", "cell"], sort=True):
        g = g.sort_values("iteration")
        out.setdefault(method, []).append((g[x].to_numpy(float), g[y].to_numpy(float)))
    return out


def pareto_plot(df: pd.DataFrame, x: str, path: Path, metrics=("eval_reward", "eval_heldout_accuracy"),
                title: str = "") -> Path:
    """One panel per metric; mean over seeds with a min-max band; the base model as a black star."""
    palette = sns.color_palette("colorblind", 10)
    fig, axes = plt.subplots(1, len(metrics), figsize=(6.2 * len(metrics), 4.4), squeeze=False)
    base = df[df.cell == BASE_CELL]
    for ax, y in zip(axes[0], metrics):
        for i, (method, curves) in enumerate(sorted(method_curves(df, x, y).items())):
            color, marker = palette[i % len(palette)], MARKERS[i % len(MARKERS)]
            gx, ys = interpolate_curves(curves)
            ax.plot(gx, ys.mean(0), color=color, marker=marker, markevery=max(1, len(gx) // 6),
                    label=f"{method} (n={len(curves)})")
            if len(curves) > 1:
                ax.fill_between(gx, ys.min(0), ys.max(0), color=color, alpha=0.18, linewidth=0)
        if len(base) and y in base and base[y].notna().any():
            ax.plot([0], [base[y].iloc[0]], marker="*", color="black", markersize=14, linestyle="none", label="base model")
        ax.set_xlabel(X_LABELS.get(x, x))
        ax.set_ylabel(y.replace("eval_", "eval ").replace("_", " "))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.suptitle(title + "  (line: mean over seeds; band: min-max over seeds)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
