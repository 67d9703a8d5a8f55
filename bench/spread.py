"""Which factor moves the result more? Spread across one grid axis against spread across another, with bootstrap CIs
(the ELBO paper's "the estimator matters more than the loss", arXiv 2602.04663, as a test on any two crossed axes)."""
from __future__ import annotations

import itertools

import numpy as np
import pandas as pd

from bench.grid import BASE_CELL

N_BOOT = 2000


def curve_means(df: pd.DataFrame, metric: str) -> pd.Series:
    """Per cell: the metric averaged over its learning curve (trapezoid over NFE / final NFE), speed and level in one."""
    out = {}
    for cell, g in df[(df.cell != BASE_CELL) & df[metric].notna()].groupby("cell"):
        g = g.sort_values("nfe")
        x, y = g.nfe.to_numpy(float), g[metric].to_numpy(float)
        out[cell] = float(np.trapezoid(y, x) / x[-1]) if len(x) > 1 and x[-1] > 0 else float(y[-1])
    return pd.Series(out, dtype=float)


def _num(v: float, signed: bool = False) -> str:
    text = f"{v:.3f}" if abs(v) < 100 else f"{v:.3g}"
    return ("+" if signed and v >= 0 else "") + text


def _spreads(cells: dict[tuple, np.ndarray], across: int, levels_a: list, levels_b: list) -> np.ndarray:
    """[len(levels_b)] range (max - min over levels_a) of the cell means, within each level of the other axis."""
    out = []
    for b in levels_b:
        means = [cells[(a, b) if across == 0 else (b, a)].mean() for a in levels_a]
        out.append(max(means) - min(means))
    return np.asarray(out)


def factor_spread(values: pd.DataFrame, axis_x: str, axis_y: str, seed: int = 0) -> dict:
    """Spread across axis_x (within each level of axis_y) vs across axis_y (within each level of axis_x), over the
    levels present in every combination; point values and 95% percentile-bootstrap CIs (seeds resampled per cell)."""
    xs = sorted(values[axis_x].unique())
    ys = sorted(values[axis_y].unique())
    cells = {(x, y): g.value.to_numpy(float) for (x, y), g in values.groupby([axis_x, axis_y])}
    # Balanced support, so neither range covers more levels: drop, one at a time, the level missing from the
    # largest share of the other axis's levels (an objective skipped under one of two estimators goes first).
    while True:
        share = [(sum((x, y) not in cells for y in ys) / len(ys), 0, x) for x in xs]
        share += [(sum((x, y) not in cells for x in xs) / len(xs), 1, y) for y in ys]
        worst, axis, level = max(share, key=lambda r: r[0])
        if worst == 0:
            break
        (xs if axis == 0 else ys).remove(level)
    if len(xs) < 2 or len(ys) < 2:
        return {}

    def stats(c):
        sx = _spreads(c, 0, xs, ys).mean()
        sy = _spreads(c, 1, ys, xs).mean()
        return sx, sy, sy - sx

    point = stats(cells)
    rng = np.random.default_rng(seed)
    boot = np.array([stats({k: rng.choice(v, len(v)) for k, v in cells.items()}) for _ in range(N_BOOT)])
    lo, hi = np.percentile(boot, [2.5, 97.5], axis=0)
    return {"x_levels": xs, "y_levels": ys, "point": point, "lo": lo, "hi": hi, "boot": boot,
            "within_y": {y: s for y, s in zip(ys, _spreads(cells, 0, xs, ys))}}


def stratified_factor_spread(values: pd.DataFrame, axis_x: str, axis_y: str, strata: list[str], seed: int = 0) -> dict:
    """factor_spread within each combination of the grid's other axes, averaged over the strata where both axes
    vary: comparing x and y only inside a stratum keeps a third axis (e.g. a sampler that only one estimator can
    use) from leaking into either spread."""
    groups = values.groupby(strata, sort=True) if strata else [((), values)]
    results = {}
    for key, g in groups:
        res = factor_spread(g, axis_x, axis_y, seed)
        if res:
            results[key if isinstance(key, tuple) else (key,)] = res
    if not results:
        return {}
    point = np.mean([r["point"] for r in results.values()], axis=0)
    # Strata are bootstrapped independently, so the mean of their replicates is a replicate of the mean.
    boot = np.mean([r["boot"] for r in results.values()], axis=0)
    lo, hi = np.percentile(boot, [2.5, 97.5], axis=0)
    return {"point": point, "lo": lo, "hi": hi, "strata": {k: (r["x_levels"], r["y_levels"]) for k, r in results.items()}}


def _within(values: pd.DataFrame, axis: str, other: str, seed: int = 0) -> list[tuple[str, float, float, float, int]]:
    """Per level of `other`: range across every `axis` level present there, with a bootstrap CI."""
    rows = []
    rng = np.random.default_rng(seed)
    for level, g in values.groupby(other, sort=True):
        cells = [h.value.to_numpy(float) for _, h in g.groupby(axis)]
        if len(cells) < 2:
            continue
        point = max(c.mean() for c in cells) - min(c.mean() for c in cells)
        boot = [np.ptp([rng.choice(c, len(c)).mean() for c in cells]) for _ in range(N_BOOT)]
        rows.append((str(level), point, *np.percentile(boot, [2.5, 97.5]), len(cells)))
    return rows


def spread_section(df: pd.DataFrame, seeds: pd.DataFrame, metric: str) -> list[str]:
    """report.md lines comparing every pair of grid axes (none when the grid has fewer than two axes)."""
    axes = [c for c in seeds.columns if c.startswith("axis:") and seeds[c].nunique() > 1]
    if len(axes) < 2 or not len(seeds):
        return []
    curve = curve_means(df, metric)
    by_cell = seeds.set_index("cell")
    # A run that never reached the threshold is counted at the budget (the largest final NFE): a lower bound.
    censored = by_cell.nfe_to_threshold.fillna(by_cell.final_nfe.max())
    quantities = {f"final {metric}": by_cell[metric],
                  f"{metric} averaged over the learning curve": curve,
                  "NFE to threshold (never reached = budget)": censored}
    lines = ["", "## Spread across factors", "",
             "Does one factor move the result more than another? For each pair of axes: the range (max - min) of the "
             "per-level means of one axis, within each level of the other, averaged over those levels; and the same "
             "the other way round, over the levels present in every combination (a level missing somewhere, e.g. "
             "an objective skipped under one estimator, is left out here and shown in the per-level table), inside each "
             "combination of the remaining axes so that no third factor is confounded with either. 95% CIs "
             "from a bootstrap over seeds within each cell; 'larger' needs the CI of the difference to exclude 0. "
             "With 3 seeds a range is biased upwards by seed noise, equally for both factors.", ""]
    for ax, ay in itertools.combinations(axes, 2):
        nx, ny = ax[5:], ay[5:]
        others = [a for a in axes if a not in (ax, ay)]
        rows, per_level, strata = [], [], {}
        for label, series in quantities.items():
            vals = seeds[["cell", ax, ay, *others]].assign(value=seeds.cell.map(series)).dropna()
            res = stratified_factor_spread(vals.rename(columns={ax: "x", ay: "y"}), "x", "y", others)
            if not res:
                continue
            strata = res["strata"]
            (sx, sy, d), lo, hi = res["point"], res["lo"], res["hi"]
            verdict = (f"{ny} spreads more" if lo[2] > 0 else f"{nx} spreads more" if hi[2] < 0
                       else "not distinguishable")
            rows.append(f"| {label} | {_num(sx)} [{_num(lo[0])}, {_num(hi[0])}] | {_num(sy)} [{_num(lo[1])}, "
                        f"{_num(hi[1])}] | {_num(d, True)} [{_num(lo[2], True)}, {_num(hi[2], True)}] | {verdict} |")
            per_level += [(label, f"{nx} within {ny}={lvl}", p, a, b, n) for lvl, p, a, b, n in _within(vals, ax, ay)]
            per_level += [(label, f"{ny} within {nx}={lvl}", p, a, b, n) for lvl, p, a, b, n in _within(vals, ay, ax)]
        if not rows:
            lines += [f"**{nx} vs {ny}**: not crossed in any stratum of the other axes, so not compared.", ""]
            continue
        where = "; ".join((", ".join(f"{o[5:]}={v}" for o, v in zip(others, k)) + ": " if others else "")
                          + f"{nx} over {', '.join(map(str, xs))}, {ny} over {', '.join(map(str, ys))}"
                          for k, (xs, ys) in strata.items())
        lines += [f"**{nx} vs {ny}**", "",
                  f"| quantity | spread across {nx} [95% CI] | spread across {ny} [95% CI] | "
                  f"{ny} minus {nx} [95% CI] | verdict |", "|---|---|---|---|---|", *rows, "",
                  f"Levels compared ({'per stratum of ' + ', '.join(o[5:] for o in others) if others else 'all runs'}): "
                  f"{where}.", "",
                  "| quantity | range (pooled over the other axes) | value [95% CI] | levels |", "|---|---|---|---|"]
        lines += [f"| {q} | {r} | {_num(p)} [{_num(a)}, {_num(b)}] | {n} |" for q, r, p, a, b, n in per_level]
        lines.append("")
    return lines
