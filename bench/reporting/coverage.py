"""How often do the report's intervals cover? Measured on a grid's own runs: for every method with many seeds
(8 or more), every subset of 3 (and of 5) seeds gets an interval, and the fraction covering the mean over all
seeds is its coverage (nominal 95%). Percentile bootstrap, BCa bootstrap and Student-t intervals are compared, for
the final metric, the learning-curve AUC, the NFE to each threshold (censored at the cap) and the paired speed-up
over the baseline.

`python -m bench.reporting.coverage results/<grid>` prints the table and writes coverage.md into the grid folder.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np
import yaml

from bench.core.lazy import lazy_module
from bench.runner import store
from bench.core.errors import UserError
from bench.reporting.findings import run_table
from bench.reporting.report import find_baseline, report_thresholds
from bench.reporting.stats import bootstrap_ci, interval_coverage, mean_ci, paired_ratio_ci

pd = lazy_module("pandas")
sps = lazy_module("scipy.stats")

MIN_SEEDS = 8


def bca_ci(values: np.ndarray) -> tuple[float, float, float]:
    """(mean, low, high): scipy's BCa bootstrap of the mean (nan where it is undefined, e.g. identical values)."""
    v = np.asarray(values, float)
    if len(v) < 2 or np.all(v == v[0]):
        return float(v.mean()), float(v.mean()), float(v.mean())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = sps.bootstrap((v,), np.mean, method="BCa", n_resamples=2000, random_state=np.random.default_rng(0))
    return float(v.mean()), float(res.confidence_interval.low), float(res.confidence_interval.high)


INTERVALS = {"percentile bootstrap": lambda v: bootstrap_ci(v, n_resamples=2000), "BCa bootstrap": bca_ci,
             "Student t": mean_ci}


def coverage_rows(runs: pd.DataFrame, metric: str, thresholds: list[float], baseline: str | None,
                  sizes: tuple[int, ...] = (3, 5)) -> list[dict]:
    """One row per (method, quantity, interval, n seeds): coverage and the number of subsets tried."""
    rows = []
    quantities = {f"final {metric}": metric, f"AUC of {metric}": "auc",
                  **{f"NFE to {t:g} (censored)": f"nfe@{t:g}" for t in thresholds}}
    for method, g in runs.groupby("method", sort=True):
        if len(g) < MIN_SEEDS:
            continue
        for label, col in quantities.items():
            pool = g[col].to_numpy(float)
            if np.all(pool == pool[0]):
                continue  # every run the same (all censored): nothing to cover
            for name, fn in INTERVALS.items():
                for n in sizes:
                    cov, k = interval_coverage(pool, n, fn)
                    rows.append({"method": method, "quantity": label, "interval": name, "seeds": n,
                                 "coverage": cov, "subsets": k, "pool": len(pool)})
        if baseline is None or method == baseline:
            continue
        base = runs[runs.method == baseline].set_index("seed")
        for t in thresholds:
            pair = g.set_index("seed")[[f"nfe@{t:g}"]].join(base[[f"nfe@{t:g}"]].add_suffix("_b"), how="inner")
            if len(pair) < MIN_SEEDS:
                continue
            logr = np.log(pair[f"nfe@{t:g}_b"].to_numpy(float) / pair[f"nfe@{t:g}"].to_numpy(float))
            if np.all(logr == logr[0]):
                continue
            for n in sizes:
                # Coverage of the geometric-mean speed-up over all paired seeds (the pool's log-mean).
                def interval(v: np.ndarray) -> tuple[float, float, float]:
                    r = paired_ratio_ci(np.exp(v), np.ones(len(v)))
                    return tuple(float(np.log(x)) for x in r)
                cov, k = interval_coverage(logr, n, interval)
                rows.append({"method": method, "quantity": f"speed-up at {t:g} vs `{baseline}`",
                             "interval": "Student t (log scale, paired)", "seeds": n, "coverage": cov, "subsets": k,
                             "pool": len(logr)})
    return rows


def coverage_markdown(rows: list[dict], grid: str) -> str:
    lines = [f"# Interval coverage on grid `{grid}`", "",
             "Fraction of the n-seed subsets whose 95% interval covers the mean over all seeds of the method "
             "(the pool); every subset is tried when there are at most 2000. The pool mean stands in for the true "
             "mean, so these slightly overstate coverage.", "",
             "| method | quantity | interval | coverage, 3 seeds | coverage, 5 seeds | pool |", "|---|---|---|---|---|---|"]
    table = pd.DataFrame(rows)
    if not len(table):
        return "\n".join(lines + ["", f"No method has {MIN_SEEDS} or more seeds: nothing measured."]) + "\n"
    for (method, quantity, interval), g in table.groupby(["method", "quantity", "interval"], sort=False):
        cov = {int(r.seeds): f"{100 * r.coverage:.0f}% ({r.subsets})" for r in g.itertuples()}
        lines.append(f"| `{method}` | {quantity} | {interval} | {cov.get(3, '—')} | {cov.get(5, '—')} | {g.pool.iloc[0]} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.reporting.coverage", description=__doc__)
    ap.add_argument("grid_dir", type=Path)
    args = ap.parse_args(argv)
    try:
        if not (args.grid_dir / "summary.parquet").exists() or not (args.grid_dir / "grid.yaml").exists():
            raise UserError(f"no summary.parquet and grid.yaml in '{args.grid_dir}'; run python -m bench.run first")
        grid_cfg = yaml.safe_load((args.grid_dir / "grid.yaml").read_text())
        df = pd.read_parquet(args.grid_dir / "summary.parquet")
        if "state" not in df:
            raise UserError(f"'{args.grid_dir}/summary.parquet' predates cell states; run python -m bench.report on it first")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    metric, _, thresholds = report_thresholds(grid_cfg)
    runs = run_table(df, metric, thresholds)
    text = coverage_markdown(coverage_rows(runs, metric, thresholds, find_baseline(runs, grid_cfg)),
                             grid_cfg.get("name", args.grid_dir.name))
    store.atomic_write_text(args.grid_dir / "coverage.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
