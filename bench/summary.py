"""Collects per-cell results into one table: results/<grid>/summary.parquet."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from bench import store
from bench.grid import BASE_CELL, Cell

KEEP = ("iteration", "nfe", "device_hours", "wall_s", "eval_reward", "eval_accuracy", "eval_heldout_accuracy",
        "eval_diversity", "eval_nearest_real")


def build_summary(grid_name: str, grid_dir: Path, cells: list[Cell], base_metrics: dict | None) -> pd.DataFrame:
    """One row per cell and eval point (plus one per skipped/failed cell and one for the base model)."""
    rows = []
    if base_metrics is not None:
        rows.append({"grid": grid_name, "cell": BASE_CELL, "method": BASE_CELL, "seed": -1, "status": "done",
                     "iteration": 0, "nfe": 0, "device_hours": 0.0, "wall_s": 0.0, **base_metrics})
    for cell in cells:
        ident = {"grid": grid_name, "cell": cell.name, "method": cell.method, "seed": cell.seed,
                 **cell.labels, **{f"axis:{k}": str(v) for k, v in cell.axes.items()}}
        if cell.skip_reason:
            rows.append({**ident, "status": "skipped", "reason": cell.skip_reason})
            continue
        st = store.read_status(grid_dir / cell.name)
        evals = [r for r in store.read_metrics(grid_dir / cell.name) if "eval_reward" in r]
        if not evals:
            rows.append({**ident, "status": st["status"], "reason": st.get("error")})
        for r in evals:
            rows.append({**ident, "status": st["status"], "reason": st.get("error"),
                         **{k: r.get(k) for k in KEEP}})
    df = pd.DataFrame(rows)
    for col in ("sampler", "estimator", "objective", "reason"):
        if col not in df:
            df[col] = None
    return df


def write_summary(df: pd.DataFrame, grid_dir: Path) -> Path:
    path = grid_dir / "summary.parquet"
    tmp = path.with_name(".summary.parquet.tmp")
    df.to_parquet(tmp, index=False)
    tmp.replace(path)
    return path
