"""report.md: the ablation table with bootstrap CIs over seeds; `python -m bench.report results/<grid>` regenerates it."""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from bench.grid import BASE_CELL
from bench.stats import bootstrap_ci, compute_to_threshold


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
            hacked = (row["eval_reward"][0] > base.eval_reward + 0.02 and
                      row["eval_heldout_accuracy"][0] < base.eval_heldout_accuracy - 0.02)
            row["hacking"] = "REWARD HACKING: reward up, held-out judge down" if hacked else ""
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


def render_report(df: pd.DataFrame, grid_cfg: dict, title: str) -> str:
    report = grid_cfg.get("report", {}) or {}
    metric, threshold = report.get("metric", "eval_reward"), float(report.get("threshold", 0.9))
    base_rows = df[df.cell == BASE_CELL]
    base = base_rows.iloc[0] if len(base_rows) else None
    baseline_spec = grid_cfg.get("baseline") or {}
    seeds = per_seed_table(df, metric, threshold)
    baseline = None
    if baseline_spec and len(seeds):
        match = seeds
        for k, v in baseline_spec.items():
            col = f"axis:{k}" if f"axis:{k}" in seeds else k
            match = match[match[col].astype(str) == str(v)]
        baseline = match.method.iloc[0] if len(match) else None
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
        hacks = [r for _, r in table.iterrows() if r.get("hacking")]
        out += ["", "## Reward-hacking check", ""]
        if hacks:
            out += [f"- `{r.method}`: {r.hacking}" for r in hacks]
        else:
            out.append("No method raised its reward while the held-out judge's accuracy fell by more than 0.02 "
                       "(watch nearest-real distance and diversity too).")
        out += ["", "## Ablation by factor", *axis_ablation(seeds, metric)]
    skipped = df[df.status == "skipped"].drop_duplicates("method")
    failed = df[df.status == "failed"].drop_duplicates("cell")
    out += ["", "## Skipped and failed cells", ""]
    if not len(skipped) and not len(failed):
        out.append("None.")
    out += [f"- skipped `{r.method}`: {r.reason}" for _, r in skipped.iterrows()]
    out += [f"- failed `{r.cell}`: {r.reason}" for _, r in failed.iterrows()]
    out += ["", "## Plots", "", "![eval reward vs NFE](pareto_nfe.png)", "", "![eval reward vs device-hours](pareto_device_hours.png)", ""]
    return "\n".join(out)


def write_report(grid_dir: Path) -> Path:
    """Regenerate report.md (and the plots) from summary.parquet and grid.yaml, without rerunning anything."""
    from bench.plots import pareto_plot

    grid_dir = Path(grid_dir)
    df = pd.read_parquet(grid_dir / "summary.parquet")
    grid_cfg = yaml.safe_load((grid_dir / "grid.yaml").read_text())
    name = grid_cfg.get("name", grid_dir.name)
    for x in ("nfe", "device_hours"):
        pareto_plot(df, x, grid_dir / f"pareto_{x}.png", title=f"grid {name}")
    path = grid_dir / "report.md"
    path.write_text(render_report(df, grid_cfg, f"Grid `{name}`"))
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__)
    ap.add_argument("grid_dir", type=Path)
    args = ap.parse_args(argv)
    if not (args.grid_dir / "summary.parquet").exists():
        print(f"error: no summary.parquet in '{args.grid_dir}'; run python -m bench.run grid=... first", file=sys.stderr)
        return 2
    print(write_report(args.grid_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
