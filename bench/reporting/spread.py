"""Which factor moves the result more? Spread across one grid axis against spread across another, with bootstrap CIs
(the ELBO paper's "the estimator matters more than the loss", arXiv 2602.04663, as a test on any two crossed axes)."""
from __future__ import annotations

import itertools

import numpy as np

from bench.core.lazy import lazy_module
from bench.runner.grid import BASE_CELL

pd = lazy_module("pandas")

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


def _seed_means(values: pd.DataFrame, by: list[str]) -> dict[tuple, dict]:
    """Per combination of the `by` columns (sorted): {seed: mean value of its rows}, from one groupby (a groupby
    per cell cost most of the report's bootstrap time)."""
    out: dict[tuple, dict] = {}
    for key, v in values.groupby([*by, "seed"], sort=True).value.mean().items():
        out.setdefault(tuple(key[:-1]), {})[key[-1]] = v
    return out


def _paired_means(cells: dict[tuple, dict], seed: int) -> tuple[dict[tuple, float], dict[tuple, np.ndarray]]:
    """Per cell: the mean over its seeds, and N_BOOT bootstrap means in which every cell draws the same seeds.
    Seeds are shared across the cells of a grid (the same seed gives the same base model, eval noise and
    initial random stream), so they are resampled jointly: two cells that are bit-identical seed for seed stay
    identical in every replicate, where resampling each cell on its own would invent a spread between them. A
    replicate that draws none of a cell's seeds (a cell missing a failed seed) uses that cell's full mean."""
    seeds = sorted({s for v in cells.values() for s in v})
    rng = np.random.default_rng(seed)
    idx = rng.integers(len(seeds), size=(N_BOOT, len(seeds)))
    point, boot = {}, {}
    for key, v in cells.items():
        row = np.array([v.get(s, np.nan) for s in seeds], dtype=float)
        draws = row[idx]
        counts = np.isfinite(draws).sum(1)
        sums = np.where(np.isfinite(draws), draws, 0.0).sum(1)
        point[key] = float(np.nanmean(row))
        boot[key] = np.where(counts > 0, sums / np.maximum(counts, 1), point[key])
    return point, boot


def _contrasts(point: dict, boot: dict, keys_per_group: list[list[tuple]]) -> tuple[np.ndarray, np.ndarray]:
    """Per group of cells: best minus worst level, with best and worst fixed by the point means, so the
    replicates bootstrap one fixed contrast (centred on the point, which lies inside its interval) rather than a
    range, whose replicates all sit above a near-zero point. Returns (points [groups], replicates [N_BOOT, groups])."""
    pts, reps = [], []
    for keys in keys_per_group:
        hi = max(keys, key=lambda k: point[k])
        lo = min(keys, key=lambda k: point[k])
        pts.append(point[hi] - point[lo])
        reps.append(boot[hi] - boot[lo])
    return np.asarray(pts), np.stack(reps, axis=1)


def factor_spread(values: pd.DataFrame, axis_x: str, axis_y: str, seed: int = 0) -> dict:
    """Spread across axis_x (within each level of axis_y) vs across axis_y (within each level of axis_x), over the
    levels present in every combination: the best-minus-worst contrast of the per-level means, averaged over the
    other axis's levels; point values and 95% paired-bootstrap CIs (seeds resampled jointly across cells).
    `values` has columns axis_x, axis_y, value and (for the pairing) seed."""
    if "seed" not in values:
        values = values.assign(seed=values.groupby([axis_x, axis_y]).cumcount())
    xs = sorted(values[axis_x].unique())
    ys = sorted(values[axis_y].unique())
    cells = _seed_means(values, [axis_x, axis_y])
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
    point, boot = _paired_means({k: cells[k] for k in itertools.product(xs, ys)}, seed)
    px, bx = _contrasts(point, boot, [[(x, y) for x in xs] for y in ys])
    py, by = _contrasts(point, boot, [[(x, y) for y in ys] for x in xs])
    pt = np.array([px.mean(), py.mean(), py.mean() - px.mean()])
    reps = np.stack([bx.mean(1), by.mean(1), by.mean(1) - bx.mean(1)], axis=1)
    lo, hi = np.percentile(reps, [2.5, 97.5], axis=0)
    return {"x_levels": xs, "y_levels": ys, "point": pt, "lo": lo, "hi": hi, "boot": reps,
            "within_y": dict(zip(ys, px))}


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
    # Each stratum draws its own seeds, so the mean of their replicates is a replicate of the mean.
    boot = np.mean([r["boot"] for r in results.values()], axis=0)
    lo, hi = np.percentile(boot, [2.5, 97.5], axis=0)
    return {"point": point, "lo": lo, "hi": hi, "strata": {k: (r["x_levels"], r["y_levels"]) for k, r in results.items()}}


def axis_contrast(values: pd.DataFrame, axis: str, strata: list[str], seed: int = 0) -> tuple[float, float, float] | None:
    """(point, low, high) of the best-minus-worst contrast across `axis`'s levels within each combination of the
    `strata` columns where at least two levels ran, averaged over those combinations; seeds drawn jointly for
    every cell (one generator seed, so every stratum draws the same seeds)."""
    groups = values.groupby(strata, sort=True) if strata else [((), values)]
    pts, reps = [], []
    for _, g in groups:
        cells = _seed_means(g.dropna(subset=["value"]), [axis])
        if len(cells) < 2:
            continue
        point, boot = _paired_means(cells, seed)
        p, r = _contrasts(point, boot, [list(cells)])
        pts.append(p[0])
        reps.append(r[:, 0])
    if not pts:
        return None
    rep = np.mean(reps, axis=0)
    lo, hi = np.percentile(rep, [2.5, 97.5])
    return float(np.mean(pts)), float(lo), float(hi)


def _within(values: pd.DataFrame, axis: str, other: str, seed: int = 0) -> list[tuple[str, float, float, float, int]]:
    """Per level of `other`: best-minus-worst contrast across every `axis` level present there (pooled over the
    remaining axes), with a paired-bootstrap CI."""
    rows = []
    for level, g in values.groupby(other, sort=True):
        cells = _seed_means(g, [axis])
        if len(cells) < 2:
            continue
        point, boot = _paired_means(cells, seed)
        p, reps = _contrasts(point, boot, [list(cells)])
        rows.append((str(level), float(p[0]), *np.percentile(reps[:, 0], [2.5, 97.5]), len(cells)))
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
             "Does one factor move the result more than another? For each pair of axes: the best-minus-worst spread of the "
             "per-level means of one axis, within each level of the other, averaged over those levels; and the same "
             "the other way round, over the levels present in every combination (a level missing somewhere, e.g. "
             "an objective skipped under one estimator, is left out here and shown in the per-level table), inside each "
             "combination of the remaining axes so that no third factor is confounded with either. 95% CIs "
             "from a paired bootstrap over seeds (the same seeds drawn for every cell, so bit-identical cells stay "
             "identical); the spread is the contrast between the best and the worst level by point estimate, "
             "resampled as that fixed contrast. 'larger' needs the CI of the difference to exclude 0.", ""]
    for ax, ay in itertools.combinations(axes, 2):
        nx, ny = ax[5:], ay[5:]
        others = [a for a in axes if a not in (ax, ay)]
        rows, per_level, strata = [], [], {}
        for label, series in quantities.items():
            vals = seeds[["cell", "seed", ax, ay, *others]].assign(value=seeds.cell.map(series)).dropna()
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
