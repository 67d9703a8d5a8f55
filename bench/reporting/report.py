"""report.md + report.html of a grid: a generated summary first (one sentence per factor: which level wins, by how
much, at what threshold, over how many seeds, and which factor matters most), the headline plot, then the tables
(methods, compute to thresholds censored at the cap, per-seed collapse and hacking checks, factor spreads,
aggregate statistics, the Pareto front over learning curves, cost), the cells' states, sample grids and configs.

`python -m bench.report results/<grid>` regenerates them without rerunning anything, over every cell of the grid
folder; `python -m bench.report results/a results/b [--out DIR]` writes one report comparing several grids.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
from pathlib import Path

import numpy as np
import yaml

from bench.core.lazy import lazy_module
from bench.runner import store
from bench.core.errors import UserError
from bench.reporting.findings import SETTLED, budget_cap, headline_threshold, identical_groups, run_table, summary_lines
from bench.runner.grid import BASE_CELL
from bench.reporting.plots import headline_plot, pareto_plot
from bench.reporting.report_html import render_png, write_html
from bench.reporting.report_sections import (cells_section, collapse_section, configs_section, envelope_section,
                                   methods_table, samples_section, sensitivity_section)
from bench.reporting.spread import spread_section
from bench.reporting.stats import (bootstrap_ci, compute_to_threshold, mean_ci, probability_of_improvement,
                         stratified_bootstrap_ci)
from bench.reporting.summary import refresh_summary
from bench.reporting.thresholds import fmt_nfe, thresholds_section
from bench.reporting.tuning_report import tuning_scores, tuning_section, tuning_summary_line
from bench.worlds import WORLDS
from bench.worlds.base import World

pd = lazy_module("pandas")


def fmt_ci(mean: float, lo: float, hi: float, digits: int = 3) -> str:
    if not math.isfinite(mean):
        return "n/a"
    return f"{mean:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def fmt_compute(v: float) -> str:
    if not math.isfinite(v):
        return "n/a"
    return f"{v:.3g}"


def cost_per_iteration(df: pd.DataFrame) -> pd.DataFrame:
    """Per run: training wall seconds, device-seconds and NFEs per iteration (eval excluded), from its last eval row."""
    runs = df[(df.cell != BASE_CELL) & df.eval_reward.notna() & (df.iteration > 0)]
    if "state" in runs:  # an unfinished cell's cost so far is not its cost
        runs = runs[runs.state.isin(SETTLED)]
    last = runs.sort_values("iteration").groupby("cell").tail(1)
    return pd.DataFrame({"method": last.method, "seed": last.seed, "iterations": last.iteration,
                         "s_per_iter": last.wall_s / last.iteration,
                         "device_s_per_iter": last.device_hours * 3600 / last.iteration,
                         "nfe_per_iter": last.nfe / last.iteration,
                         # optimizer steps per 100k NFE: part of a method's edge can be more updates per NFE
                         "steps_per_100k": (last.optimizer_steps / last.nfe * 1e5 if "optimizer_steps" in last
                                            else np.nan)})


def fewer_verdict(method: np.ndarray, base: np.ndarray) -> str:
    """Does `method` need less compute than `base` to reach the threshold (per-seed values, nan = never)?"""
    m_ok, b_ok = np.isfinite(method), np.isfinite(base)
    if not m_ok.any():
        return f"no: never reached ({len(method)} seeds)"
    if not m_ok.all():
        return f"no: reached in {int(m_ok.sum())}/{len(method)} seeds only"
    m, b = bootstrap_ci(method), bootstrap_ci(base)
    text = f"{fmt_compute(m[0])} [{fmt_compute(m[1])}, {fmt_compute(m[2])}] vs "
    if not b_ok.all():
        return text + f"baseline reached in {int(b_ok.sum())}/{len(base)} seeds: yes"
    text += f"{fmt_compute(b[0])} [{fmt_compute(b[1])}, {fmt_compute(b[2])}]: "
    if m[2] < b[1]:
        return text + f"yes, {b[0] / m[0]:.2g}x fewer (CIs disjoint)"
    if m[1] > b[2]:
        return text + f"no, {m[0] / b[0]:.2g}x more (CIs disjoint)"
    return text + ("lower mean but CIs overlap: not shown" if m[0] < b[0] else "no (CIs overlap)")


def cost_section(df: pd.DataFrame, seeds: pd.DataFrame, baseline: str | None) -> list[str]:
    """Seconds and NFEs per iteration per method, and whether each reached the threshold cheaper than the baseline."""
    cost = cost_per_iteration(df)
    if not len(cost):
        return []
    base_seeds = seeds[seeds.method == baseline] if baseline is not None else seeds.iloc[:0]
    lines = ["", "## Cost per iteration", "",
             "Training wall seconds and NFEs per iteration (rollout, reward and update; eval excluded), means over "
             "seeds with 95% bootstrap CIs: the analogue of TreeGRPO's 72 s (tree) vs 145 s (MixGRPO) vs 184 s "
             "(DanceGRPO) per iteration. Methods do different amounts of work per iteration (samples, trained "
             "steps), so the equal-budget comparison is the compute to threshold, tested against the baseline: "
             "'yes' needs the method's CI entirely below the baseline's.", "",
             f"| method | iterations | seconds / iteration | NFE / iteration | optimizer steps / 100k NFE | "
             f"fewer NFEs to threshold than `{baseline}`? | fewer device-seconds to threshold than `{baseline}`? |",
             "|---|---|---|---|---|---|---|"]
    for method, g in cost.groupby("method", sort=True):
        s = seeds[seeds.method == method]
        if method == baseline or not len(base_seeds):
            nfe_v = hours_v = "(baseline)" if method == baseline else "n/a"
        else:
            nfe_v = fewer_verdict(s.nfe_to_threshold.to_numpy(float), base_seeds.nfe_to_threshold.to_numpy(float))
            hours_v = fewer_verdict(s.hours_to_threshold.to_numpy(float) * 3600, base_seeds.hours_to_threshold.to_numpy(float) * 3600)
        lines.append(f"| {method} | {fmt_ci(*bootstrap_ci(g.iterations), digits=0)} | {fmt_ci(*bootstrap_ci(g.s_per_iter))} | "
                     f"{fmt_ci(*bootstrap_ci(g.nfe_per_iter), digits=0)} | "
                     f"{g.steps_per_100k.mean():.0f} | {nfe_v} | {hours_v} |".replace("| nan |", "| n/a |"))
    return lines


def statistics_section(seeds: pd.DataFrame, baseline: str | None, metric: str) -> list[str]:
    """IQM and mean of the final metric with stratified bootstrap CIs, and P(method beats the baseline)."""
    if not len(seeds) or metric not in seeds:
        return []
    lines = ["", "## Aggregate statistics", "",
             f"Final {metric} per method over seeds: interquartile mean (IQM: the mean of the middle 50% of runs, "
             "robust to one outlier seed; equal to the mean below 4 seeds) with a 95% percentile-bootstrap CI, the "
             "mean with its 95% t interval, and the probability of improvement P(a run of the method beats a run of the baseline) with its CI "
             "(0.5: no difference; rliable's interval estimates).", "",
             f"| method | seeds | IQM final {metric} [95% CI] | mean final {metric} [95% CI] | "
             f"P(method > `{baseline}`) [95% CI] |", "|---|---|---|---|---|"]
    base_vals = seeds[seeds.method == baseline][metric].to_numpy(float) if baseline is not None else None
    for method, g in seeds.groupby("method", sort=True):
        vals = g[metric].to_numpy(float)
        if base_vals is None or not len(base_vals):
            poi = "n/a (no baseline)"
        elif method == baseline:
            poi = "(baseline)"
        else:
            poi = fmt_ci(*probability_of_improvement([vals], [base_vals]), digits=2)
        lines.append(f"| {method} | {len(g)} | {fmt_ci(*bootstrap_ci(vals, statistic='iqm'))} | "
                     f"{fmt_ci(*mean_ci(vals))} | {poi} |")
    return lines


def report_thresholds(grid_cfg: dict) -> tuple[str, float, list[float]]:
    """(metric, main threshold, every threshold) of a grid's report settings."""
    report = grid_cfg.get("report", {}) or {}
    metric, threshold = report.get("metric", "eval_reward"), float(report.get("threshold", 0.9))
    thresholds = sorted({threshold, *(float(t) for t in (report.get("thresholds") or []))})
    return metric, threshold, thresholds


def split_stages(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the compared cells and the base model, the tuning sweep's cells): tuning runs never enter a comparison."""
    tune = df["stage"].eq("tune") if "stage" in df else pd.Series(False, index=df.index)
    return df[~tune], df[tune]


def tuning_runs(tune_df: pd.DataFrame, grid_cfg: dict, metric: str, thresholds: list[float]
                ) -> tuple[pd.DataFrame, str]:
    """The tuning runs' table with each run's selection score, and the selection rule (grid.tune.select)."""
    tune = grid_cfg.get("tune") or {}
    select, metric = str(tune.get("select", "auc")), str(tune.get("metric") or metric)
    if not len(tune_df):
        return tune_df, select
    return tuning_scores(run_table(tune_df, metric, thresholds, budget_of(grid_cfg)), select, metric), select


def budget_of(grid_cfg: dict) -> float | None:
    """The fixed NFE budget final figures and AUCs are read at (None: each run's end)."""
    b = grid_cfg.get("budget_nfe")
    return float(b) if b is not None else None


def find_baseline(runs: pd.DataFrame, grid_cfg: dict) -> str | None:
    """The method whose axes match the grid's `baseline:` spec, or None."""
    spec = grid_cfg.get("baseline") or {}
    if not spec or not len(runs):
        return None
    match = runs
    for k, v in spec.items():
        col = f"axis:{k}" if f"axis:{k}" in runs else k
        if col not in match:
            return None
        match = match[match[col].astype(str) == str(v)]
    return match.method.iloc[0] if len(match) else None


def grid_context(df: pd.DataFrame, grid_cfg: dict) -> tuple[str, float, pd.DataFrame, str | None]:
    """(report metric, main threshold, per-run table, baseline method or None) of one grid's summary."""
    metric, threshold, thresholds = report_thresholds(grid_cfg)
    runs = run_table(df, metric, thresholds, budget_of(grid_cfg))
    if len(runs):
        # The uncensored compute to the main threshold (nan when never reached), for the cost verdicts.
        runs["nfe_to_threshold"] = np.where(runs[f"reached@{threshold:g}"], runs[f"nfe@{threshold:g}"], np.nan)
        hours = {c: compute_to_threshold(g.sort_values("iteration").device_hours, g.sort_values("iteration")[metric],
                                         threshold) for c, g in df[df.cell.isin(runs.cell) & df[metric].notna()].groupby("cell")}
        runs["hours_to_threshold"] = runs.cell.map(hours)
    return metric, threshold, runs, find_baseline(runs, grid_cfg)


def world_class(df: pd.DataFrame, grid_dir: Path | None) -> type[World]:
    """The world the grid's cells ran in (from a cell's config.yaml), for its eval metrics and detectors."""
    if grid_dir is not None:
        for cell in df[df.cell != BASE_CELL].cell.drop_duplicates():
            path = Path(grid_dir) / cell / store.CONFIG_FILE
            if path.exists():
                name = ((yaml.safe_load(path.read_text()) or {}).get("world") or {}).get("name")
                if name in WORLDS:
                    return WORLDS.get(name)
    return World


def distinct_methods(df: pd.DataFrame, runs: pd.DataFrame, baseline: str | None
                     ) -> tuple[list[list[str]], dict[str, list[str]], list[str]]:
    """(bit-identical groups, representative -> the methods it stands for, the methods to report: one per group,
    the baseline first). A group's representative is the baseline, else the member sharing most axis values
    with the baseline."""
    groups = identical_groups(df)
    base_axes = set()
    if baseline is not None and bool((runs.method == baseline).any()):
        b = runs[runs.method == baseline].iloc[0]
        base_axes = {(c, b[c]) for c in runs.columns if c.startswith("axis:")}

    def closeness(m: str) -> int:
        mine = runs[runs.method == m]
        if mine.empty:  # a method with no finished run (all failed before an eval)
            return 0
        r = mine.iloc[0]
        return sum((c, r[c]) in base_axes for c in runs.columns if c.startswith("axis:"))

    aliases, hidden = {}, set()
    for g in groups:
        keep = baseline if baseline in g else max(g, key=lambda m: (closeness(m), [-ord(ch) for ch in m]))
        aliases[keep] = [m for m in g if m != keep]
        hidden |= set(aliases[keep])
    methods = [m for m in sorted(runs.method.unique()) if m not in hidden] if len(runs) else []
    if baseline in methods:
        methods = [baseline] + [m for m in methods if m != baseline]
    return groups, aliases, methods


def plotted(df: pd.DataFrame, aliases: dict[str, list[str]]) -> pd.DataFrame:
    """The summary without the methods a bit-identical representative stands for, that one labelled 'a ≡ b'."""
    hidden = {m for ms in aliases.values() for m in ms}
    out = df[~df.method.isin(hidden)].copy()
    out["method"] = out.method.map(lambda m: f"{m} ≡ {', '.join(aliases[m])}" if aliases.get(m) else m)
    return out


def render_report(df: pd.DataFrame, grid_cfg: dict, title: str, grid_dir: Path | None = None,
                  world: type[World] | None = None) -> str:
    """The report's markdown; with grid_dir, also the sample grids and configs it holds."""
    world = world or world_class(df, grid_dir)
    df, tune_df = split_stages(df)
    metric, threshold, runs, baseline = grid_context(df, grid_cfg)
    _, _, thresholds = report_thresholds(grid_cfg)
    cap = budget_cap(df)
    columns = [c for c in world.EVAL_METRICS if c in df and df[c].notna().any()]
    base_rows = df[df.cell == BASE_CELL]
    base = base_rows.iloc[0] if len(base_rows) else None
    groups, aliases, methods = distinct_methods(df, runs, baseline)
    states = df[df.cell != BASE_CELL].drop_duplicates("cell").state.value_counts()
    out = [f"# {title}", ""]
    setup = [f"Budget per cell: {grid_cfg.get('budget_text') or 'see grid.yaml'}", f"metric: {metric}",
             f"thresholds: {', '.join(f'{t:g}' for t in thresholds)}", f"baseline: `{baseline}`",
             "cells: " + ", ".join(f"{n} {s}" for s, n in states.items())]
    out += ["; ".join(setup) + ".", ""]
    out += ["## Summary", ""]
    if len(runs):
        axes_of_base = {}
        if baseline is not None:
            b = runs[runs.method == baseline].iloc[0]
            axes_of_base = {c[5:]: b[c] for c in runs.columns if c.startswith("axis:") and isinstance(b[c], str)}
        out += summary_lines(runs, df, metric, thresholds, axes_of_base,
                             (grid_cfg.get("report") or {}).get("contrasts"), budget_of(grid_cfg))
        t_star = headline_threshold(runs, thresholds, runs.method == baseline if baseline else None)
        tune_runs, select = tuning_runs(tune_df, grid_cfg, metric, thresholds)
        tune_metric = str((grid_cfg.get("tune") or {}).get("metric") or metric)
        if (line := tuning_summary_line(tune_runs, runs, select, tune_metric)) is not None:
            out.append(line)
    else:
        t_star = None
        out.append("- No run has finished yet: nothing to compare.")
    collapse_lines, flagged = collapse_section(df, runs, metric, world.detectors(), world.name) if len(runs) else ([], {})
    notes = []
    if flagged:
        notes.append("collapse or hacking signs in " + ", ".join(f"`{m}` {k}/{int((runs.method == m).sum())} seeds"
                                                                for m, k in sorted(flagged.items())))
    diverged = runs[runs.state == "diverged"].method.value_counts() if len(runs) else {}
    if len(diverged):
        notes.append("diverged: " + ", ".join(f"`{m}` {k}/{int((runs.method == m).sum())}" for m, k in diverged.items()))
    if groups:
        notes.append("bit-identical (reported once): " + "; ".join(" ≡ ".join(f"`{m}`" for m in g) for g in groups))
    pending = int(states.get("unfinished", 0) + states.get("pending", 0))
    if pending:
        notes.append(f"{pending} cells not finished (see Cells): the figures cover finished runs only")
    out += [f"- {n[0].upper() + n[1:]}." for n in notes]
    out += ["- Intervals are 95% Student-t over seeds (ratios: on the log scale); percentile-bootstrap intervals "
            "undercover with 3-5 seeds (measured coverage: docs/statistics.md)."]
    out += ["", "![headline: learning curves against NFE](headline.png)", ""]
    if len(runs):
        out += ["## Methods", "",
                f"Final figures of each method's runs at the {fmt_nfe(budget_of(grid_cfg) or cap)}-NFE budget (mean [95% t "
                f"interval]); AUC: the mean {metric} over that budget (area under the learning curve / budget; a "
                f"diverged run counts 0 from its divergence on); NFE to the headline threshold {t_star:g} counts runs "
                f"that never reached it at the {fmt_nfe(cap)}-NFE cap (>=: a lower bound)." if t_star is not None
                else f"Final figures of each method's runs (mean [95% t interval]); AUC: the mean {metric} over the budget.",
                ""]
        if base is not None:
            out += ["Base model: " + ", ".join(f"{short_name(c)} {base[c]:.3f}" for c in columns
                                                if c in base and pd.notna(base[c])) + ".", ""]
        out += methods_table(runs, metric, columns, t_star, baseline, methods, aliases, flagged)
        out += thresholds_section(runs, metric, thresholds, baseline, cap, methods)
        if (grid_cfg.get("report") or {}).get("device_seconds"):  # e.g. trees: fewer NFE is not fewer seconds
            out += thresholds_section(runs, metric, thresholds, baseline, cap, methods, unit="sec")
        out += collapse_lines
        out += tuning_section(tune_runs, runs, select, tune_metric, budget_of(grid_cfg))
        out += sensitivity_section(runs, metric)
        out += spread_section(df, runs, metric)
        out += statistics_section(runs[runs.method.isin(methods)], baseline, metric)
        out += envelope_section(plotted(df, aliases), list(dict.fromkeys([metric, "eval_reward", "eval_heldout_accuracy"])))
        out += cost_section(df, runs, baseline)
        out += device_noise_lines(df, groups)
    out += cells_section(df)
    out += ["", "## Plots", "", "![figures against NFE](pareto_nfe.png)", "",
            "Device-hours (noisy on a shared CPU: bit-identical cells can differ by half):", "",
            "![figures against device-hours](pareto_device_hours.png)", ""]
    if grid_dir is not None and len(runs):
        out += samples_section(df, runs, Path(grid_dir), metric, methods, world.sample_layout())
        out += configs_section(runs, Path(grid_dir), baseline, methods)
        out.append("")
    return "\n".join(out)


def short_name(metric: str) -> str:
    return metric.removeprefix("eval_").replace("_", " ")


def device_noise_lines(df: pd.DataFrame, groups: list[list[str]]) -> list[str]:
    """How far device-hours of bit-identical runs differ: the measurement noise of the device-hours axis."""
    rel = []
    for g in groups:
        last = df[df.method.isin(g) & df.eval_reward.notna()].sort_values("iteration").groupby("cell").tail(1)
        for _, s in last.groupby("seed"):
            h = s.device_hours.to_numpy(float)
            if len(h) > 1 and h.min() > 0:
                rel.append(h.max() / h.min() - 1)
    if not rel:
        return []
    return ["", f"Device-hours noise: bit-identical runs (same seed, same numbers) differ in device-hours by "
            f"{100 * np.median(rel):.0f}% (median) and up to {100 * max(rel):.0f}% on this machine; NFE is the "
            "headline axis."]


def write_report(grid_dir: Path, refresh: bool = False, html: bool = True) -> Path:
    """Regenerate report.md, report.html and the plots from summary.parquet and grid.yaml, without rerunning
    anything; with refresh, rebuild summary.parquet from the grid folder first (every cell in it: cells still
    running, finished by other runners or Slurm jobs, or by an earlier invocation)."""
    grid_dir = Path(grid_dir)
    store.check_results_version(grid_dir)
    grid_cfg = yaml.safe_load((grid_dir / "grid.yaml").read_text())
    name = grid_cfg.get("name", grid_dir.name)
    if refresh or not (grid_dir / "summary.parquet").exists():
        refresh_summary(grid_dir, name)
    df = pd.read_parquet(grid_dir / "summary.parquet")
    if "state" not in df or df.state.isna().all():  # a summary written before cells had states
        refresh_summary(grid_dir, name)
        df = pd.read_parquet(grid_dir / "summary.parquet")
    metric, _, thresholds = report_thresholds(grid_cfg)
    compared = split_stages(df)[0]
    _, _, runs, baseline = grid_context(compared, grid_cfg)
    shown = plotted(compared, distinct_methods(compared, runs, baseline)[1])
    headline_plot(shown, metric, thresholds, grid_dir / "headline.png", title=f"grid {name}")
    for x in ("nfe", "device_hours"):
        pareto_plot(shown, x, grid_dir / f"pareto_{x}.png", metrics=tuple(dict.fromkeys(["eval_reward", metric, "eval_heldout_accuracy"])),
                    title=f"grid {name}")
    path = grid_dir / "report.md"
    store.atomic_write_text(path, render_report(df, grid_cfg, f"Grid `{name}`", grid_dir))
    if html:
        write_html(path)
    return path


def _relink(md: str, src_dir: Path, out_dir: Path) -> str:
    """Rewrite the relative image and link targets of a report in src_dir so they resolve from out_dir."""
    def fix(m: re.Match) -> str:
        target = m.group(2)
        if re.match(r"^([a-z]+:|#|/)", target):
            return m.group(0)
        return f"{m.group(1)}({os.path.relpath(Path(src_dir) / target, out_dir)})"
    return re.sub(r"(!?\[[^\]]*\])\(([^)\s]+)\)", fix, md)


def comparison_table(grids: list[tuple[str, pd.DataFrame, dict]]) -> list[str]:
    """Methods (matched by name) across grids: final metric per grid, and pooled over grids the IQM and the
    probability of beating each grid's baseline, with stratified bootstrap CIs (each grid a stratum)."""
    contexts = [(label, *grid_context(df, cfg)) for label, df, cfg in grids]
    metric = contexts[0][1]
    methods = sorted({m for *_, seeds, _ in contexts for m in seeds.method} if contexts else set())
    lines = [f"Final {metric} per grid (mean over seeds [95% CI], seeds), and pooled over the grids that ran the "
             "method: the IQM and P(method > that grid's baseline), stratified bootstrap with each grid a stratum.", "",
             "| method | " + " | ".join(f"`{c[0]}`" for c in contexts) + " | pooled IQM [95% CI] | pooled P(> baseline) [95% CI] |",
             "|---" * (len(contexts) + 3) + "|"]
    for method in methods:
        cells, strata, xs, ys = [], [], [], []
        for label, m, _thr, seeds, baseline in contexts:
            g = seeds[seeds.method == method]
            vals = g[metric].to_numpy(float) if metric in g else np.array([])
            cells.append(f"{fmt_ci(*bootstrap_ci(vals))} ({len(vals)})" if len(vals) else "—")
            if len(vals):
                strata.append(vals)
                if baseline is not None and baseline != method:
                    xs.append(vals)
                    ys.append(seeds[seeds.method == baseline][metric].to_numpy(float))
        pooled = fmt_ci(*stratified_bootstrap_ci(strata, "iqm")) if strata else "n/a"
        poi = fmt_ci(*probability_of_improvement(xs, ys), digits=2) if xs else "n/a"
        lines.append(f"| `{method}` | " + " | ".join(cells) + f" | {pooled} | {poi} |")
    return lines


def compare_report(grid_dirs: list[Path], out_dir: Path, refresh: bool = False, html: bool = True) -> Path:
    """One report over several grids in out_dir: a cross-grid table, then each grid's own report (regenerated)."""
    out_dir = Path(out_dir)
    grids = []
    for gd in grid_dirs:
        write_report(gd, refresh=refresh, html=False)
        cfg = yaml.safe_load((Path(gd) / "grid.yaml").read_text())
        grids.append((Path(gd), cfg, pd.read_parquet(Path(gd) / "summary.parquet")))
    names = [cfg.get("name", gd.name) for gd, cfg, _ in grids]
    labels = [n if names.count(n) == 1 else f"{gd.parent.name}/{n}" for n, (gd, _, _) in zip(names, grids)]
    out = [f"# Comparison of grids {', '.join(f'`{n}`' for n in labels)}", "",
           "## Across grids", "", *comparison_table([(lab, df, cfg) for lab, (_, cfg, df) in zip(labels, grids)]), ""]
    for label, (gd, _cfg, _df) in zip(labels, grids):
        body = (gd / "report.md").read_text().split("\n", 1)[1]  # its own title is replaced by the one below
        body = re.sub(r"^(#+) ", lambda m: "#" + m.group(1) + " ", body, flags=re.M)  # each grid one level down
        out += [f"## Grid `{label}` ({gd})", _relink(body, gd, out_dir), ""]
    store.check_writable(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "report.md"
    store.atomic_write_text(path, "\n".join(out))
    if html:
        write_html(path)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__)
    ap.add_argument("grid_dirs", type=Path, nargs="+", metavar="grid_dir", help="results/<grid> folder(s)")
    ap.add_argument("--out", type=Path, default=None,
                    help="where a multi-grid report goes (default: <parent of the first>/compare-<a>-<b>...)")
    ap.add_argument("--no-refresh", action="store_true",
                    help="use summary.parquet as it is instead of rebuilding it from the cell folders")
    ap.add_argument("--png", type=Path, default=None, help="also render report.html to this PNG (headless Chromium)")
    args = ap.parse_args(argv)
    try:
        for gd in args.grid_dirs:
            if not (gd / "summary.parquet").exists() and not (gd / "cells.json").exists():
                raise UserError(f"no results in '{gd}' (no summary.parquet or cells.json); run python -m bench.run grid=... first")
            if not (gd / "grid.yaml").exists():
                raise UserError(f"no grid.yaml in '{gd}'; is it a results/<grid> folder?")
            store.check_results_version(gd)
        if len(args.grid_dirs) == 1 and args.out is None:
            path = write_report(args.grid_dirs[0], refresh=not args.no_refresh)
        else:
            out = args.out or args.grid_dirs[0].parent / ("compare-" + "-".join(g.name for g in args.grid_dirs))
            path = compare_report(args.grid_dirs, out, refresh=not args.no_refresh)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    print(path.with_suffix(".html"))
    if args.png is not None:
        print(render_png(path.with_suffix(".html"), args.png))
    return 0


if __name__ == "__main__":
    sys.exit(main())
