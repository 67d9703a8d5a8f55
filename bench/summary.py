"""Collects per-cell results into one table: results/<grid>/summary.parquet."""
from __future__ import annotations

import json
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
    # Every column the report reads exists even when no cell reached an eval (e.g. all failed on missing weights).
    for col in ("sampler", "estimator", "objective", "reason", *KEEP):
        if col not in df:
            df[col] = None
    return df


def write_summary(df: pd.DataFrame, grid_dir: Path) -> Path:
    path = Path(grid_dir) / "summary.parquet"
    with store.atomic_path(path) as tmp:  # two runners finishing one grid both write it
        df.to_parquet(tmp, index=False)
    return path


MANIFEST_FILE = "cells.json"


def write_manifest(grid_dir: Path, cells: list[Cell]) -> Path:
    """The grid's cells (name, method, seed, axes, labels, skip reason) as run, so `python -m bench.report` can
    rebuild the summary from the cell folders without composing configs again (e.g. while cells still run)."""
    path = Path(grid_dir) / MANIFEST_FILE
    store.atomic_write_text(path, json.dumps([{"name": c.name, "method": c.method, "seed": c.seed,
                                               "axes": {k: str(v) for k, v in c.axes.items()}, "labels": c.labels,
                                               "skip_reason": c.skip_reason} for c in cells], indent=1))
    return path


def read_manifest(grid_dir: Path) -> list[Cell] | None:
    path = Path(grid_dir) / MANIFEST_FILE
    if not path.exists():
        return None
    return [Cell(d["name"], d["method"], int(d["seed"]), d["axes"], [], None, d.get("skip_reason"), d.get("labels") or {})
            for d in json.loads(path.read_text())]


def refresh_summary(grid_dir: Path, grid_name: str) -> Path | None:
    """Rebuild summary.parquet from the cell folders listed in cells.json (None if the grid has no manifest)."""
    cells = read_manifest(grid_dir)
    if cells is None:
        return None
    from bench.execute import read_base_metrics

    return write_summary(build_summary(grid_name, Path(grid_dir), cells, read_base_metrics(grid_dir)), Path(grid_dir))
