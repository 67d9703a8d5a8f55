"""What a grid found, in numbers the report's first screen states: per run the compute to each threshold (censored
at the cap, never dropped), the area under its learning curve and its final figures; methods that came out
bit-identical; and per factor which level wins, by how much (a speed-up ratio with a t interval over seeds,
paired by seed within each combination of the other axes), at which threshold, and which factor matters most."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from bench.core.lazy import lazy_module
from bench.runner.grid import BASE_CELL
from bench.reporting.spread import axis_contrast
from bench.reporting.stats import censored_time, learning_curve_auc, mean_ci, paired_ratio_ci
from bench.reporting.thresholds import fmt_nfe

pd = lazy_module("pandas")

SETTLED = ("finished", "diverged")  # runs whose figures are results (a diverged run counts as one)
TIMING = ("wall_s", "device_hours")


def budget_cap(df: pd.DataFrame) -> float:
    """The compute cap a censored run is counted at: the largest final NFE of any settled run (the budget)."""
    runs = df[(df.cell != BASE_CELL) & df.state.isin(SETTLED) & df.nfe.notna()]
    return float(runs.groupby("cell").nfe.max().max()) if len(runs) else float("nan")


def at_budget(g: pd.DataFrame, budget: float | None) -> pd.DataFrame:
    """A run's eval rows up to the fixed budget: through the first eval at or past `budget` NFE (all rows without
    one, or for a run that stopped before it)."""
    if budget is None or not math.isfinite(budget):
        return g
    past = np.flatnonzero(g.nfe.to_numpy(float) >= budget)
    return g.iloc[:past[0] + 1] if len(past) else g


def run_table(df: pd.DataFrame, metric: str, thresholds: list[float], budget: float | None = None) -> pd.DataFrame:
    """One row per settled run with eval rows: identity, state, final eval figures and AUC of the metric read at
    the fixed `budget` (NFE; default: each run's end), and over the whole run (which budget.until may extend to a
    cap) per threshold t the NFE to reach it (`nfe@t`, the cap when never) and whether it did (`reached@t`). A run
    that diverged counts 0 in the AUC from its last eval on: failures count against the method."""
    cap = budget_cap(df)
    horizon = min(cap, budget) if budget is not None and math.isfinite(budget) else cap
    rows = []
    runs = df[(df.cell != BASE_CELL) & df.state.isin(SETTLED) & df.eval_reward.notna()]
    # Device-seconds have no fixed budget: a run that never got there counts at the longest run's device time.
    cap_s = float(runs.groupby("cell").device_hours.max().max() * 3600) if len(runs) else float("nan")
    for cell, g in runs.groupby("cell"):
        g = g.sort_values("iteration")
        within = at_budget(g, budget)
        last = within.iloc[-1]
        x, y = within.nfe.to_numpy(float), within[metric].to_numpy(float) if metric in g else None
        if y is not None and last.state == "diverged" and len(within) == len(g):
            x, y = np.append(x, x[-1]), np.append(y, 0.0)
        row = {"method": last.method, "cell": cell, "seed": int(last.seed), "state": last.state,
               "state_text": last.state_text,
               **{c: last[c] for c in g.columns if c.startswith(("eval_", "axis:", "tune:"))},
               "final_nfe": float(last.nfe), "final_device_hours": float(last.device_hours),
               "end_nfe": float(g.nfe.iloc[-1]),
               "auc": learning_curve_auc(x, y, horizon) if y is not None else float("nan")}
        y = g[metric] if metric in g else pd.Series(np.nan, index=g.index)  # a world without the metric
        for t in thresholds:
            row[f"nfe@{t:g}"], row[f"reached@{t:g}"] = censored_time(g.nfe, y, t, cap)
            row[f"sec@{t:g}"] = censored_time(g.device_hours * 3600, y, t, cap_s)[0]
        rows.append(row)
    return pd.DataFrame(rows)


def identical_groups(df: pd.DataFrame) -> list[list[str]]:
    """Groups of methods whose runs are bit-identical seed for seed on every non-timing column of every eval row
    (e.g. grpo_clip and epg with one optimizer step per batch). Groups of one are left out."""
    runs = df[(df.cell != BASE_CELL) & df.eval_reward.notna()]
    cols = [c for c in runs.columns if (c.startswith("eval_") or c in ("iteration", "nfe")) and c not in TIMING]
    sig: dict[str, tuple] = {}
    for method, g in runs.groupby("method", sort=True):
        g = g.sort_values(["seed", "iteration"])
        sig[method] = (tuple(g.seed), tuple(map(tuple, g[cols].astype(float).fillna(-1e300).to_numpy())))
    groups: dict[tuple, list[str]] = {}
    for m, s in sig.items():
        groups.setdefault(s, []).append(m)
    return [g for g in groups.values() if len(g) > 1]


def headline_threshold(runs: pd.DataFrame, thresholds: list[float], who: pd.Series | None = None) -> float | None:
    """The highest threshold that at least half of the runs in `who` (default: all) reached."""
    sel = runs if who is None else runs[who]
    for t in sorted(thresholds, reverse=True):
        if len(sel) and sel[f"reached@{t:g}"].mean() >= 0.5:
            return t
    return None


@dataclass
class Effect:
    """One level of a factor against the reference level, paired by seed within the other axes' combinations."""

    axis: str
    level: str
    ref: str
    threshold: float | None
    ratio: tuple[float, float, float]           # reference NFE / level NFE: > 1 means the level is faster
    final_diff: tuple[float, float, float]      # level minus reference, final metric
    seeds: int
    strata: int
    reached: tuple[int, int, int, int]          # level reached / runs, reference reached / runs
    identical: bool
    seconds_ratio: tuple[float, float, float] = (float("nan"),) * 3  # the same speed-up in device-seconds


def _pairs(runs: pd.DataFrame, axis: str, level: str, ref: str) -> pd.DataFrame:
    """Rows (stratum, seed) with the level's and the reference's run side by side."""
    others = [c for c in runs.columns if c.startswith("axis:") and c != axis and runs[c].nunique() > 0]
    key = [*others, "seed"]
    a = runs[runs[axis] == level].set_index(key)
    b = runs[runs[axis] == ref].set_index(key)
    return a.join(b.add_suffix("_ref"), how="inner")


def factor_effect(runs: pd.DataFrame, axis: str, level: str, ref: str, metric: str,
                  thresholds: list[float]) -> Effect | None:
    """How `level` of `axis` compares with `ref` at the highest threshold both reached in at least half of their
    paired runs: the geometric-mean speed-up over seeds (each seed's log-ratio averaged over the strata), with a t
    interval, and the paired difference in the final metric."""
    p = _pairs(runs, axis, level, ref)
    if not len(p):
        return None
    seeds = p.index.get_level_values("seed")
    strata = p.index.droplevel("seed").unique() if p.index.nlevels > 1 else [()]
    chosen = None
    for t in sorted(thresholds, reverse=True):
        if p[f"reached@{t:g}"].mean() >= 0.5 and p[f"reached@{t:g}_ref"].mean() >= 0.5:
            chosen = t
            break
    identical = all(np.array_equal(p[c].to_numpy(float), p[f"{c}_ref"].to_numpy(float), equal_nan=True)
                    for c in p.columns if c.startswith("eval_") and f"{c}_ref" in p)
    if chosen is not None:
        def per_seed(col: str) -> tuple[float, float, float]:
            logr = pd.Series(np.log(p[f"{col}_ref"].to_numpy(float) / p[col].to_numpy(float)),
                             index=seeds).groupby(level=0).mean()
            return paired_ratio_ci(np.exp(logr.to_numpy()), np.ones(len(logr)))

        ratio = per_seed(f"nfe@{chosen:g}")
        seconds = per_seed(f"sec@{chosen:g}")
        reached = (int(p[f"reached@{chosen:g}"].sum()), len(p), int(p[f"reached@{chosen:g}_ref"].sum()), len(p))
    else:
        ratio, seconds, reached = (float("nan"),) * 3, (float("nan"),) * 3, (0, len(p), 0, len(p))
    diff = pd.Series(p[metric].to_numpy(float) - p[f"{metric}_ref"].to_numpy(float), index=seeds)
    return Effect(axis[5:], level, ref, chosen, ratio, mean_ci(diff.groupby(level=0).mean()),
                  int(seeds.nunique()), len(strata), reached, identical, seconds)


def _x(v: tuple[float, float, float]) -> str:
    return f"{v[0]:.2f}x [{v[1]:.2f}, {v[2]:.2f}]"


def _ci(v: tuple[float, float, float], signed: bool = False) -> str:
    s = "+" if signed else ""
    return f"{v[0]:{s}.2f} [{v[1]:{s}.2f}, {v[2]:{s}.2f}]"


def effect_sentence(e: Effect, metric: str, cap: float, seconds: bool = False, why: str = "") -> str:
    """One sentence: which level wins, by how much, at what threshold, over how many seeds (with `seconds`, also
    the speed-up in device-seconds; `why` says what the comparison isolates)."""
    m = metric.removeprefix("eval_")
    where = (f"{e.seeds} seeds" if e.seeds > 1 else "1 seed, so no interval") + (
        f" x {e.strata} combinations of the other axes" if e.strata > 1 else "")
    if e.identical:
        return (f"**{e.axis}**: `{e.level}` and `{e.ref}` are bit-identical in all {e.reached[1]} paired runs "
                f"({where}): the factor has no effect here by construction (ratio 1.00x exactly).")
    if e.threshold is None:
        return (f"**{e.axis}**: neither `{e.level}` nor `{e.ref}` reached any threshold in half of its runs; final "
                f"{m} differs by {_ci(e.final_diff, True)} (`{e.level}` minus `{e.ref}`, {where}).")
    faster = e.ratio[0] >= 1
    win, lose = (e.level, e.ref) if faster else (e.ref, e.level)
    r = e.ratio if faster else (1 / e.ratio[0], 1 / e.ratio[2], 1 / e.ratio[1])
    censored = ""
    if e.reached[0] < e.reached[1] or e.reached[2] < e.reached[3]:
        censored = (f"; runs that never reached it count at the {fmt_nfe(cap)}-NFE cap (reached: `{e.level}` "
                    f"{e.reached[0]}/{e.reached[1]}, `{e.ref}` {e.reached[2]}/{e.reached[3]})")
    final = f"final {m} `{e.level}` minus `{e.ref}`: {_ci(e.final_diff, True)}"
    if seconds and all(math.isfinite(v) for v in e.seconds_ratio):
        sr = e.seconds_ratio if faster else (1 / e.seconds_ratio[0], 1 / e.seconds_ratio[2], 1 / e.seconds_ratio[1])
        final = f"in device-seconds (noisy on a shared CPU) {_x(sr)}; " + final
    if why:
        final += f" ({why})"
    if r[1] <= 1:
        return (f"**{e.axis}**: `{win}` and `{lose}` are not distinguishable: at {m} {e.threshold:g} `{win}` needs "
                f"{_x(r)} fewer NFE, an interval that includes 1 ({where}{censored}); {final}.")
    return (f"**{e.axis}**: `{win}` reaches {m} {e.threshold:g} with {_x(r)} fewer NFE than `{lose}` "
            f"({where}{censored}); {final}.")


def factor_effects(runs: pd.DataFrame, baseline_axes: dict[str, str], metric: str,
                   thresholds: list[float]) -> list[Effect]:
    """Every non-reference level of every axis against the reference level (the baseline's, else the first)."""
    out = []
    for axis in [c for c in runs.columns if c.startswith("axis:") and runs[c].nunique() > 1]:
        levels = sorted(runs[axis].dropna().unique())
        ref = baseline_axes.get(axis[5:], levels[0])
        if ref not in levels:
            ref = levels[0]
        for level in levels:
            if level != ref and (e := factor_effect(runs, axis, level, ref, metric, thresholds)) is not None:
                out.append(e)
    return out


def importance(runs: pd.DataFrame) -> list[tuple[str, tuple[float, float, float]]]:
    """Per axis: the best-minus-worst contrast of the learning-curve AUC across its levels within each combination
    of the other axes, averaged (paired bootstrap CI, bench/reporting/spread.py), largest first."""
    axes = [c for c in runs.columns if c.startswith("axis:") and runs[c].nunique() > 1]
    out = []
    for axis in axes:
        others = [a for a in axes if a != axis]
        res = axis_contrast(runs.rename(columns={"auc": "value"}), axis, others)
        if res is not None and all(math.isfinite(v) for v in res):
            out.append((axis[5:], res))
    return sorted(out, key=lambda r: -r[1][0])


def summary_lines(runs: pd.DataFrame, df: pd.DataFrame, metric: str, thresholds: list[float],
                  baseline_axes: dict[str, str], contrasts: list[dict] | None = None,
                  budget: float | None = None) -> list[str]:
    """The report's opening bullets: one sentence per factor level against the reference level, one per
    requested contrast (grid.report.contrasts: [{axis, levels: [a, b], why}], with device-seconds too), and which
    factor matters most."""
    cap = budget_cap(df)
    lines = [f"- {effect_sentence(e, metric, cap)}" for e in factor_effects(runs, baseline_axes, metric, thresholds)]
    for c in contrasts or []:
        if "methods" in c:  # two methods, paired by seed (e.g. a control that differs in several keys)
            a, b = map(str, c["methods"])
            pair = runs[runs.method.isin([a, b])].drop(columns=[k for k in runs.columns if k.startswith("axis:")])
            pair = pair.assign(**{"axis:method": pair.method})
            e = factor_effect(pair, "axis:method", a, b, metric, thresholds) if pair.method.nunique() == 2 else None
        else:
            axis, (a, b) = f"axis:{c['axis']}", c["levels"]
            e = factor_effect(runs, axis, str(a), str(b), metric, thresholds) if axis in runs else None
        if e is not None:
            lines.append(f"- {effect_sentence(e, metric, cap, seconds=True, why=c.get('why', ''))}")
    ranked = importance(runs)
    m = metric.removeprefix("eval_")
    if len(ranked) >= 2:
        (top, v), rest = ranked[0], ranked[1:]
        lines.append(f"- **{top} matters most**: across its levels the area under the {m}-vs-NFE curve (mean {m} over "
                     f"the {fmt_nfe(budget or cap)}-NFE budget) moves by {_ci(v)}, against "
                     + ", ".join(f"{a} {_ci(w)}" for a, w in rest) + " (paired bootstrap over seeds).")
    elif len(ranked) == 1:
        lines.append(f"- One factor varies: **{ranked[0][0]}** moves the {m} AUC by {_ci(ranked[0][1])}.")
    return lines
