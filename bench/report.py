"""report.md + report.html: the ablation table with bootstrap CIs over seeds, IQM, probability of improvement,
Pareto fronts, sample grids and resolved configs.

`python -m bench.report results/<grid>` regenerates them without rerunning anything;
`python -m bench.report results/a results/b [--out DIR]` writes one report comparing several grids.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from bench import store
from bench.errors import UserError
from bench.grid import BASE_CELL
from bench.spread import spread_section
from bench.thresholds import thresholds_section
from bench.stats import (bootstrap_ci, compute_to_threshold, pareto_front, probability_of_improvement,
                         stratified_bootstrap_ci)


def fmt_ci(mean: float, lo: float, hi: float, digits: int = 3) -> str:
    if not math.isfinite(mean):
        return "n/a"
    return f"{mean:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def fmt_compute(v: float) -> str:
    if not math.isfinite(v):
        return "n/a"
    return f"{v:.3g}"


def per_seed_table(df: pd.DataFrame, metric: str, threshold: float) -> pd.DataFrame:
    """One row per finished run: final eval figures and compute to reach the threshold."""
    rows = []
    runs = df[(df.cell != BASE_CELL) & df.status.isin(["done", "failed", "running"]) & df.eval_reward.notna()]
    for cell, g in runs.groupby("cell"):
        g = g.sort_values("iteration")
        last = g.iloc[-1]
        rows.append({"method": last.method, "cell": cell, "seed": last.seed, "status": last.status,
                     **{c: last[c] for c in ("sampler", "estimator", "objective")},
                     **{c: last[c] for c in g.columns if c.startswith("eval_") or c.startswith("axis:")},
                     "final_nfe": last.nfe, "final_device_hours": last.device_hours,
                     "nfe_to_threshold": compute_to_threshold(g.nfe, g[metric], threshold),
                     "hours_to_threshold": compute_to_threshold(g.device_hours, g[metric], threshold)})
    return pd.DataFrame(rows)


HACKING_COLUMNS = ("eval_reward", "eval_accuracy", "eval_heldout_accuracy", "eval_nearest_real")


def hacking_signs(final: dict[str, float], base: pd.Series) -> list[str]:
    """Ways a method's final means diverge from the detectors, relative to the base model (digits detectors;
    a world without them yields none). Each sign alone is a warning, not a verdict."""
    def get(d, k):
        v = d.get(k) if isinstance(d, dict) else getattr(d, k, None)
        return float(v) if v is not None and math.isfinite(float(v)) else None

    r, acc, held, near = (get(final, k) for k in HACKING_COLUMNS)
    r0, acc0, held0, near0 = (get(base, k) for k in HACKING_COLUMNS)
    signs = []
    if None not in (r, r0, held, held0) and r > r0 + 0.02 and held < held0 - 0.02:
        signs.append(f"reward up ({r0:.2f} -> {r:.2f}) while the held-out judge fell ({held0:.2f} -> {held:.2f})")
    if None not in (acc, acc0, held, held0) and (acc - held) > (acc0 - held0) + 0.15:
        signs.append(f"the reward judge accepts what the held-out judge rejects (accuracy {acc:.2f} vs held-out "
                     f"{held:.2f}; base gap {acc0 - held0:+.2f})")
    if None not in (r, r0, near, near0) and r > r0 + 0.02 and near > 1.15 * near0:
        signs.append(f"samples drift from real digits (nearest-real distance {near0:.2f} -> {near:.2f})")
    return signs


def method_table(seeds: pd.DataFrame, base: pd.Series | None, baseline: str | None) -> pd.DataFrame:
    rows = []
    base_nfe = base_h = float("nan")
    if baseline is not None and baseline in set(seeds.method):
        b = seeds[seeds.method == baseline]
        base_nfe, base_h = b.nfe_to_threshold.mean(), b.hours_to_threshold.mean()
    for method, g in seeds.groupby("method", sort=True):
        reached = g.nfe_to_threshold.notna()
        row = {"method": method, "seeds": len(g), "failed": int((g.status == "failed").sum()),
               "reached": f"{int(reached.sum())}/{len(g)}"}
        for col in ("eval_reward", "eval_accuracy", "eval_heldout_accuracy", "eval_diversity", "eval_nearest_real"):
            row[col] = bootstrap_ci(g[col].to_numpy(float))
        row["nfe_to_threshold"] = bootstrap_ci(g.nfe_to_threshold.to_numpy(float))
        row["hours_to_threshold"] = bootstrap_ci(g.hours_to_threshold.to_numpy(float))
        row["speedup_nfe"] = base_nfe / row["nfe_to_threshold"][0] if reached.all() else float("nan")
        row["speedup_hours"] = base_h / row["hours_to_threshold"][0] if reached.all() else float("nan")
        if base is not None:
            acc_lo = row["eval_accuracy"][1]
            row["improved"] = "yes" if acc_lo > base.eval_accuracy else "no (CI overlaps base)" if row["eval_accuracy"][0] > base.eval_accuracy else "no"
            signs = hacking_signs({c: row[c][0] for c in HACKING_COLUMNS}, base)
            row["hacking"] = "possible reward hacking: " + "; ".join(signs) if signs else ""
        rows.append(row)
    return pd.DataFrame(rows)


def axis_ablation(seeds: pd.DataFrame, metric: str) -> list[str]:
    """Per axis: each value's mean final metric and compute-to-threshold, pooled over the other axes."""
    lines = []
    for axis in [c for c in seeds.columns if c.startswith("axis:")]:
        vals = seeds[axis].dropna().unique()
        if len(vals) < 2:
            continue
        lines += [f"\n**{axis[5:]}** (pooled over the other axes and seeds)\n",
                  f"| {axis[5:]} | runs | final {metric} [95% CI] | NFE to threshold [95% CI] (runs that reached) |",
                  "|---|---|---|---|"]
        for v in sorted(vals):
            g = seeds[seeds[axis] == v]
            lines.append(f"| {v} | {len(g)} | {fmt_ci(*bootstrap_ci(g[metric]))} | "
                         f"{fmt_ci(*bootstrap_ci(g.nfe_to_threshold), digits=0)} ({int(g.nfe_to_threshold.notna().sum())}/{len(g)}) |")
    return lines


def cost_per_iteration(df: pd.DataFrame) -> pd.DataFrame:
    """Per run: training wall seconds, device-seconds and NFEs per iteration (eval excluded), from its last eval row."""
    runs = df[(df.cell != BASE_CELL) & df.eval_reward.notna() & (df.iteration > 0)]
    last = runs.sort_values("iteration").groupby("cell").tail(1)
    return pd.DataFrame({"method": last.method, "seed": last.seed, "iterations": last.iteration,
                         "s_per_iter": last.wall_s / last.iteration,
                         "device_s_per_iter": last.device_hours * 3600 / last.iteration,
                         "nfe_per_iter": last.nfe / last.iteration})


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
             f"| method | iterations | seconds / iteration | NFE / iteration | fewer NFEs to threshold than `{baseline}`? | "
             f"fewer device-seconds to threshold than `{baseline}`? |", "|---|---|---|---|---|---|"]
    for method, g in cost.groupby("method", sort=True):
        s = seeds[seeds.method == method]
        if method == baseline or not len(base_seeds):
            nfe_v = hours_v = "(baseline)" if method == baseline else "n/a"
        else:
            nfe_v = fewer_verdict(s.nfe_to_threshold.to_numpy(float), base_seeds.nfe_to_threshold.to_numpy(float))
            hours_v = fewer_verdict(s.hours_to_threshold.to_numpy(float) * 3600, base_seeds.hours_to_threshold.to_numpy(float) * 3600)
        lines.append(f"| {method} | {fmt_ci(*bootstrap_ci(g.iterations), digits=0)} | {fmt_ci(*bootstrap_ci(g.s_per_iter))} | "
                     f"{fmt_ci(*bootstrap_ci(g.nfe_per_iter), digits=0)} | {nfe_v} | {hours_v} |")
    return lines


def grid_context(df: pd.DataFrame, grid_cfg: dict) -> tuple[str, float, pd.DataFrame, str | None]:
    """(report metric, threshold, per-seed finals, baseline method or None) of one grid's summary."""
    report = grid_cfg.get("report", {}) or {}
    metric, threshold = report.get("metric", "eval_reward"), float(report.get("threshold", 0.9))
    seeds = per_seed_table(df, metric, threshold)
    baseline_spec = grid_cfg.get("baseline") or {}
    baseline = None
    if baseline_spec and len(seeds):
        match = seeds
        for k, v in baseline_spec.items():
            col = f"axis:{k}" if f"axis:{k}" in seeds else k
            if col not in match:
                match = match.iloc[:0]
                break
            match = match[match[col].astype(str) == str(v)]
        baseline = match.method.iloc[0] if len(match) else None
    return metric, threshold, seeds, baseline


def statistics_section(seeds: pd.DataFrame, baseline: str | None, metric: str) -> list[str]:
    """IQM and mean of the final metric with stratified bootstrap CIs, and P(method beats the baseline)."""
    if not len(seeds) or metric not in seeds:
        return []
    lines = ["", "## Aggregate statistics", "",
             f"Final {metric} per method over seeds: interquartile mean (IQM: the mean of the middle 50% of runs, "
             "robust to one outlier seed; equal to the mean below 4 seeds) and mean, with 95% percentile-bootstrap "
             "CIs, and the probability of improvement P(a run of the method beats a run of the baseline) with its CI "
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
                     f"{fmt_ci(*bootstrap_ci(vals))} | {poi} |")
    return lines


def pareto_section(df: pd.DataFrame, metrics: list[str]) -> list[str]:
    """The non-dominated methods in (final compute, final figure), per compute axis and figure."""
    from bench.plots import final_points

    lines = ["", "## Pareto front", "",
             "Methods no other method beats on both axes at once: less (or equal) training compute at the end of "
             "the run and a higher (or equal) final figure, means over seeds; ringed on the plots below. The base "
             "model (zero compute) is left out.", "",
             "| compute | figure | on the front (cheapest first) | dominated |", "|---|---|---|---|"]
    for x in ("nfe", "device_hours"):
        for y in metrics:
            if y not in df or not df[y].notna().any():
                continue
            finals = final_points(df, x, y)
            front = pareto_front(finals)
            rest = sorted(set(finals) - set(front))
            lines.append(f"| {x} | {y} | {', '.join(f'`{m}`' for m in front) or 'none'} | "
                         f"{', '.join(f'`{m}`' for m in rest) or 'none'} |")
    return lines


def _representative_cells(df: pd.DataFrame) -> dict[str, str]:
    """Per method, the cell of its lowest seed that has eval rows."""
    runs = df[(df.cell != BASE_CELL) & df.eval_reward.notna()].sort_values(["method", "seed"])
    return {m: g.cell.iloc[0] for m, g in runs.groupby("method", sort=True)}


def samples_section(df: pd.DataFrame, grid_dir: Path, metric: str, max_points: int = 5) -> list[str]:
    """Per method, the eval sample grids (fixed noise, one row per prompt) from the start to the end of training,
    so reward hacking (saturated prototypes, textures) is visible."""
    cells = _representative_cells(df)
    if not cells:
        return []
    base_img = f"{BASE_CELL}/eval_base.png"
    base_cell = f"![base model]({base_img})<br>base model" if (grid_dir / base_img).exists() else "n/a"
    rows = []
    for method, cell in cells.items():
        evals = df[(df.cell == cell) & df.eval_reward.notna()].sort_values("iteration")
        picks = sorted({int(round(i)) for i in np.linspace(0, len(evals) - 1, min(max_points, len(evals)))})
        shots = []
        for _, r in evals.iloc[picks].iterrows():
            img = f"{cell}/samples/eval_{int(r.iteration):04d}.png"
            caption = f"it {int(r.iteration)}, NFE {fmt_compute(float(r.nfe))}<br>reward {r.eval_reward:.3f}"
            if metric != "eval_reward" and metric in r and pd.notna(r[metric]):
                caption += f", {metric.removeprefix('eval_')} {r[metric]:.3f}"
            if "eval_heldout_accuracy" in r and pd.notna(r.eval_heldout_accuracy):
                caption += f"<br>held-out {r.eval_heldout_accuracy:.3f}"
            shots.append(f"![{cell} iteration {int(r.iteration)}]({img})<br>{caption}" if (grid_dir / img).exists()
                         else f"(no image)<br>{caption}")
        rows.append((method, cell, shots))
    width = max(len(shots) for *_, shots in rows)
    lines = ["", "## Samples", "",
             f"Eval samples of each method's lowest seed on the eval's fixed noise, at up to {max_points} eval points "
             "from the start to the end of training (one row per prompt/class). A rising reward with collapsing "
             "variety or off-prompt images is reward hacking.", "",
             "| method (cell) | base model | " + " | ".join(["eval"] * width) + " |", "|---" * (width + 2) + "|"]
    lines += [f"| `{method}`<br>({cell}) | {base_cell} | " + " | ".join(shots + [""] * (width - len(shots))) + " |"
              for method, cell, shots in rows]
    return lines


RUNNER_KEYS = ("seed", "results_dir", "launcher", "logger", "lock")  # how a cell ran, not what it is


def _flatten(d: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def configs_section(df: pd.DataFrame, grid_dir: Path, baseline: str | None) -> list[str]:
    """Each method's resolved config (its lowest seed's config.yaml), folded, with the keys where it differs from
    the baseline's."""
    cells = _representative_cells(df)
    configs = {m: grid_dir / c / "config.yaml" for m, c in cells.items() if (grid_dir / c / "config.yaml").exists()}
    if not configs:
        return []
    flat = {m: {k: v for k, v in _flatten(yaml.safe_load(p.read_text()) or {}).items()
                if k.split(".")[0] not in RUNNER_KEYS} for m, p in configs.items()}
    ref = flat.get(baseline) if baseline is not None else None
    lines = ["", "## Resolved config per method", "",
             "The full config each method ran with (its lowest seed; other seeds differ only in `seed`).", ""]
    for method, path in configs.items():
        diff = ""
        if ref is not None and method != baseline:
            keys = sorted(k for k in set(ref) | set(flat[method]) if ref.get(k) != flat[method].get(k))
            # A config group swapped for another (estimator: stepwise -> elbo) changes all its keys: name the swap.
            swapped = sorted({k.split(".")[0] for k in keys if k.endswith(".name") and k.count(".") == 1})
            parts = [f"{g}={flat[method].get(g + '.name')} (baseline: {ref.get(g + '.name')})" for g in swapped]
            parts += [k for k in keys if k.split(".")[0] not in swapped]
            diff = f" — differs from the baseline in: {', '.join(parts) if parts else 'nothing'}"
        elif method == baseline:
            diff = " — the baseline"
        lines += [f"<details><summary><code>{method}</code> ({path.relative_to(grid_dir)}){diff}</summary>", "",
                  "```yaml", path.read_text().rstrip("\n"), "```", "", "</details>"]
    return lines


def render_report(df: pd.DataFrame, grid_cfg: dict, title: str, grid_dir: Path | None = None) -> str:
    """The report's markdown; with grid_dir, also the per-method sample grids and resolved configs it holds."""
    metric, threshold, seeds, baseline = grid_context(df, grid_cfg)
    base_rows = df[df.cell == BASE_CELL]
    base = base_rows.iloc[0] if len(base_rows) else None
    out = [f"# {title}", ""]
    budget = grid_cfg.get("budget_text")
    if budget:
        out += [f"Budget per cell: {budget}. Threshold: {metric} >= {threshold}. Baseline: `{baseline}`.", ""]
    if base is not None:
        out += ["## Base model (before RL)", "",
                "| eval reward | accuracy | held-out accuracy | diversity | nearest-real distance |", "|---|---|---|---|---|",
                f"| {base.eval_reward:.3f} | {base.eval_accuracy:.3f} | {base.eval_heldout_accuracy:.3f} | "
                f"{base.eval_diversity:.3f} | {base.eval_nearest_real:.3f} |", ""]
    if len(seeds):
        table = method_table(seeds, base, baseline)
        out += ["## Methods", "",
                "Final figures are means over seeds with 95% percentile-bootstrap CIs. Compute to threshold is "
                f"the training compute at which eval {metric} first reaches {threshold} (linear interpolation "
                "between eval points), over the seeds that reached it. Speed-up = baseline compute / method compute "
                "(only when every seed reached the threshold).", "",
                "| method | seeds | final eval reward | final accuracy | held-out accuracy | diversity | nearest-real | "
                "reached | NFE to threshold | device-h to threshold | speed-up (NFE) | speed-up (device-h) | improved over base |",
                "|---" * 13 + "|"]
        for _, r in table.iterrows():
            name = f"**{r.method}** (baseline)" if r.method == baseline else r.method
            out.append(f"| {name} | {r.seeds}{' (' + str(r.failed) + ' failed)' if r.failed else ''} | "
                       f"{fmt_ci(*r.eval_reward)} | {fmt_ci(*r.eval_accuracy)} | {fmt_ci(*r.eval_heldout_accuracy)} | "
                       f"{fmt_ci(*r.eval_diversity)} | {fmt_ci(*r.eval_nearest_real)} | {r.reached} | "
                       f"{fmt_ci(*r.nfe_to_threshold, digits=0)} | {fmt_ci(*r.hours_to_threshold, digits=5)} | "
                       f"{fmt_compute(r.speedup_nfe)} | {fmt_compute(r.speedup_hours)} | {r.get('improved', '')} |")
        out += thresholds_section(df, grid_cfg, baseline)
        out += cost_section(df, seeds, baseline)
        hacks = [r for _, r in table.iterrows() if r.get("hacking")]
        out += ["", "## Reward-hacking check", ""]
        if hacks:
            out += [f"- `{r.method}`: {r.hacking}" for r in hacks]
        else:
            out.append("No method shows a sign of reward hacking: none raised its reward while the held-out judge's "
                       "accuracy fell by more than 0.02, none opened a gap of more than 0.15 between the reward judge's "
                       "and the held-out judge's accuracy beyond the base model's, and none moved its samples more "
                       "than 15% further from the nearest real digit (diversity is in the table above).")
        out += ["", "## Ablation by factor", *axis_ablation(seeds, metric)]
        out += spread_section(df, seeds, metric)
        out += statistics_section(seeds, baseline, metric)
        out += pareto_section(df, list(dict.fromkeys([metric, "eval_reward", "eval_heldout_accuracy"])))
    skipped = df[df.status == "skipped"].drop_duplicates("method")
    failed = df[df.status == "failed"].drop_duplicates("cell")
    out += ["", "## Skipped and failed cells", ""]
    if not len(skipped) and not len(failed):
        out.append("None.")
    out += [f"- skipped `{r.method}`: {r.reason}" for _, r in skipped.iterrows()]
    out += [f"- failed `{r.cell}`: {r.reason}" for _, r in failed.iterrows()]
    out += ["", "## Plots", "", "![eval reward vs NFE](pareto_nfe.png)", "", "![eval reward vs device-hours](pareto_device_hours.png)", ""]
    if grid_dir is not None:
        out += samples_section(df, Path(grid_dir), metric)
        out += configs_section(df, Path(grid_dir), baseline)
        out.append("")
    return "\n".join(out)


def write_report(grid_dir: Path, refresh: bool = False, html: bool = True) -> Path:
    """Regenerate report.md, report.html and the plots from summary.parquet and grid.yaml, without rerunning
    anything; with refresh, rebuild summary.parquet from the cell folders first (cells still running, or finished
    by other runners or Slurm jobs)."""
    from bench.plots import pareto_plot
    from bench.report_html import write_html
    from bench.summary import refresh_summary

    grid_dir = Path(grid_dir)
    store.check_results_version(grid_dir)
    grid_cfg = yaml.safe_load((grid_dir / "grid.yaml").read_text())
    name = grid_cfg.get("name", grid_dir.name)
    if refresh or not (grid_dir / "summary.parquet").exists():
        refresh_summary(grid_dir, name)
    df = pd.read_parquet(grid_dir / "summary.parquet")
    metric = (grid_cfg.get("report") or {}).get("metric", "eval_reward")
    for x in ("nfe", "device_hours"):
        pareto_plot(df, x, grid_dir / f"pareto_{x}.png", metrics=tuple(dict.fromkeys(["eval_reward", metric, "eval_heldout_accuracy"])),
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
    from bench.report_html import write_html

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
        from bench.report_html import render_png

        print(render_png(path.with_suffix(".html"), args.png))
    return 0


if __name__ == "__main__":
    sys.exit(main())
