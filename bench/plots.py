"""Pareto plots: eval figures against compute, one mean curve and a band over seeds per method, the Pareto front
(final compute vs final figure) marked. Methods differ by colour (seaborn's colour-blind palette), marker and line
style, so the plots read in greyscale and for colour-blind readers."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from bench import store  # noqa: E402
from bench.grid import BASE_CELL  # noqa: E402
from bench.stats import interpolate_curves, pareto_front  # noqa: E402

MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">"]
LINESTYLES = ["-", "--", "-.", ":"]
X_LABELS = {"device_hours": "device-hours (training only)", "nfe": "model evaluations (NFE-equivalents)"}


def method_style(i: int) -> dict:
    """Colour, marker and line style of the i-th method; the line style cycles with a different period than the
    markers, so no two of the first 40 methods look alike even without colour."""
    palette = sns.color_palette("colorblind", 10)
    return {"color": palette[i % len(palette)], "marker": MARKERS[i % len(MARKERS)],
            "linestyle": LINESTYLES[(i // len(MARKERS) + i) % len(LINESTYLES)]}


def method_curves(df: pd.DataFrame, x: str, y: str) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    out: dict[str, list] = {}
    if y not in df:  # a world without this metric (sd3 has no held-out judge), or no cell reached an eval
        return out
    runs = df[(df.cell != BASE_CELL) & df[y].notna()]
    for (method, _cell), g in runs.groupby(["method", "cell"], sort=True):
        g = g.sort_values("iteration")
        out.setdefault(method, []).append((g[x].to_numpy(float), g[y].to_numpy(float)))
    return out


def final_points(df: pd.DataFrame, x: str, y: str) -> dict[str, tuple[float, float]]:
    """Per method: (mean over seeds of the final compute x, mean over seeds of the final figure y)."""
    return {m: (float(np.mean([c[0][-1] for c in curves])), float(np.mean([c[1][-1] for c in curves])))
            for m, curves in method_curves(df, x, y).items()}


def pareto_plot(df: pd.DataFrame, x: str, path: Path, metrics=("eval_reward", "eval_heldout_accuracy"),
                title: str = "") -> Path:
    """One panel per metric; mean over seeds with a min-max band; the base model as a black star; the Pareto
    front of the methods' final points (less compute, higher figure) as a black step line through rings."""
    metrics = [m for m in metrics if m in df and df[m].notna().any()] or ["eval_reward"]
    methods = sorted(df[df.cell != BASE_CELL].method.dropna().unique())
    style = {m: method_style(i) for i, m in enumerate(methods)}
    fig, axes = plt.subplots(1, len(metrics), figsize=(6.2 * len(metrics), 4.6), squeeze=False)
    base = df[df.cell == BASE_CELL]
    for ax, y in zip(axes[0], metrics):
        for method, curves in sorted(method_curves(df, x, y).items()):
            st = style[method]
            gx, ys = interpolate_curves(curves)
            ax.plot(gx, ys.mean(0), color=st["color"], marker=st["marker"], linestyle=st["linestyle"],
                    markevery=max(1, len(gx) // 6), linewidth=1.8, label=f"{method} (n={len(curves)})")
            if len(curves) > 1:
                ax.fill_between(gx, ys.min(0), ys.max(0), color=st["color"], alpha=0.15, linewidth=0)
        finals = final_points(df, x, y)
        front = pareto_front(finals)
        if front:
            fx, fy = zip(*(finals[m] for m in front))
            ax.step(fx, fy, where="post", color="black", linestyle=(0, (1, 1)), linewidth=1.2)
            ax.plot(fx, fy, linestyle="none", marker="o", markersize=15, markerfacecolor="none",
                    markeredgecolor="black", markeredgewidth=1.6, label="Pareto front (final compute vs final)")
            for m in front:
                ax.plot(*finals[m], linestyle="none", marker=style[m]["marker"], color=style[m]["color"], markersize=7)
        if len(base) and y in base and base[y].notna().any():
            ax.plot([0], [base[y].iloc[0]], marker="*", color="black", markersize=14, linestyle="none", label="base model")
        ax.set_xlabel(X_LABELS.get(x, x))
        ax.set_ylabel(y.replace("eval_", "eval ").replace("_", " "))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best", framealpha=0.85)
    fig.suptitle(title + "  (line: mean over seeds; band: min-max over seeds; rings: Pareto front)", fontsize=10)
    fig.tight_layout()
    with store.atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return Path(path)
