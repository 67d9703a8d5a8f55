"""`python -m bench.perf tree_share [GRID_DIR] [--method M] [--baseline B] [--threshold T] [--metric K]`: how much of a
method's NFE saving survives as wall time, from a finished grid (default results/tree_vs_trajectory, tree_grpo
against flow_grpo at eval_accuracy 0.8).

Per seed: NFE and training wall seconds (eval excluded) at the first eval that reaches the threshold, for both
methods; speed-up = baseline / method; share = mean wall speed-up / mean NFE speed-up (1.0: every NFE saved is
time saved; issue 12's target 0.85), with a 95% paired bootstrap interval over seeds (the same seeds drawn for
both speed-ups). Seeds where either method never reached the threshold are left out and counted. Wall seconds on
a shared machine are noisy: run the grid with launcher=local on a quiet one.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

SHARE_TARGET = 0.85
N_BOOT = 2000


def first_crossing(df: pd.DataFrame, method: str, seed: int, metric: str, threshold: float) -> tuple[float, float] | None:
    """(NFE, wall seconds) at the first eval of (method, seed) with metric >= threshold, or None."""
    g = df[(df.method == method) & (df.seed == seed) & df[metric].notna()].sort_values("iteration")
    hit = g[g[metric] >= threshold]
    return (float(hit.nfe.iloc[0]), float(hit.wall_s.iloc[0])) if len(hit) else None


def speedups(df: pd.DataFrame, method: str, baseline: str, metric: str, threshold: float
             ) -> tuple[list[tuple[int, float, float]], list[int]]:
    """Per seed both reached: (seed, NFE speed-up, wall speed-up); and the seeds left out."""
    rows, missing = [], []
    for seed in sorted(int(s) for s in df[df.method == method].seed.dropna().unique()):
        a, b = first_crossing(df, method, seed, metric, threshold), first_crossing(df, baseline, seed, metric, threshold)
        if a is None or b is None or a[1] <= 0:
            missing.append(seed)
            continue
        rows.append((seed, b[0] / a[0], b[1] / a[1]))
    return rows, missing


def share_ci(rows: list[tuple[int, float, float]], seed: int = 0) -> tuple[float, float, float]:
    """(share, low, high): mean wall speed-up / mean NFE speed-up, 95% paired bootstrap over seeds."""
    r = np.array([x[1:] for x in rows], dtype=float)
    point = r[:, 1].mean() / r[:, 0].mean()
    idx = np.random.default_rng(seed).integers(len(r), size=(N_BOOT, len(r)))
    boot = r[idx, 1].mean(1) / r[idx, 0].mean(1)
    return float(point), float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))


def main(argv: list[str]) -> int:
    """Entry point of `python -m bench.perf tree_share`; 0 on success, 2 on bad input."""
    ap = argparse.ArgumentParser(prog="python -m bench.perf tree_share", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("grid_dir", nargs="?", default="results/tree_vs_trajectory")
    ap.add_argument("--method", default="tree_grpo")
    ap.add_argument("--baseline", default="flow_grpo")
    ap.add_argument("--metric", default="eval_accuracy")
    ap.add_argument("--threshold", type=float, default=0.8)
    args = ap.parse_args(argv)
    path = Path(args.grid_dir) / "summary.parquet"
    if not path.exists():
        print(f"error: {path}: no such file; valid: a finished grid folder (python -m bench.run grid=tree_vs_trajectory)",
              file=sys.stderr)
        return 2
    df = pd.read_parquet(path)
    methods = sorted(str(m) for m in df.method.dropna().unique())
    for name in (args.method, args.baseline):
        if name not in methods:
            print(f"error: method '{name}' not in {path}; valid: {', '.join(methods)}", file=sys.stderr)
            return 2
    if args.metric not in df:
        print(f"error: --metric {args.metric}: not a column of {path}", file=sys.stderr)
        return 2
    rows, missing = speedups(df, args.method, args.baseline, args.metric, args.threshold)
    print(f"{args.method} vs {args.baseline} to {args.metric} >= {args.threshold:g} ({path.parent}):\n")
    print("| seed | NFE speed-up | wall speed-up | share |\n|---|---|---|---|")
    for seed, nfe_up, wall_up in rows:
        print(f"| {seed} | {nfe_up:.2f}x | {wall_up:.2f}x | {wall_up / nfe_up:.2f} |")
    if missing:
        print(f"\nleft out (a method never reached the threshold): seeds {', '.join(map(str, missing))}")
    if len(rows) < 2:
        print("\nfewer than 2 seeds reached the threshold with both methods: no interval")
        return 0
    share, lo, hi = share_ci(rows)
    print(f"\nwall-time saving as a share of the NFE saving: {share:.2f} [95% CI {lo:.2f}, {hi:.2f}] over {len(rows)} "
          f"seeds (target >= {SHARE_TARGET:.2f}: {'met' if share >= SHARE_TARGET else 'NOT met'})")
    return 0
