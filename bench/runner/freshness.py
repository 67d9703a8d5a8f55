"""Is a grid folder's summary and report up to date? A key over everything they are built from, so a rerun that
changed nothing (every cell reused) skips rebuilding them (seconds of pandas, matplotlib and bootstrap).

The key hashes: the grid's config section, each cell's name, config hash, skip reason and the stat (size,
mtime_ns) of the files the summary reads in its folder (status, metrics, identity), the base model's figures,
and the stat of the reporting code itself (an edited report is rebuilt). It is written beside the report
(`.report_key`) only after the report is, so an interrupted rebuild is redone.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable

from bench.runner import store

KEY_FILE = ".report_key"
CELL_FILES = ("status.json", store.METRICS_FILE, "identity.json")
OUTPUTS = ("summary.parquet", "report.md")
REPORTING_CODE = Path(__file__).resolve().parents[1] / "reporting"


def _stat(path: Path) -> list[int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return [st.st_size, st.st_mtime_ns]


def report_key(grid_dir: Path, grid_section: Any, cells: Iterable[Any]) -> str:
    """The key of the summary and report these inputs give (`cells`: bench.runner.grid.Cell, this run's and
    earlier runs')."""
    grid_dir = Path(grid_dir)
    parts: dict[str, Any] = {
        "grid": json.dumps(grid_section, sort_keys=True, default=str),
        "cells": [[c.name, c.hash, c.skip_reason, getattr(c, "stage", None), [_stat(grid_dir / c.name / f) for f in CELL_FILES]]
                  for c in cells],
        "base": _stat(grid_dir / "base" / "metrics.json"),
        "code": sorted([p.name, *(_stat(p) or [])] for p in REPORTING_CODE.glob("*.py")),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def is_fresh(grid_dir: Path, key: str) -> bool:
    """True if the folder's summary and report were built from inputs with this key."""
    grid_dir = Path(grid_dir)
    path = grid_dir / KEY_FILE
    return path.exists() and path.read_text().strip() == key and all((grid_dir / f).exists() for f in OUTPUTS)


def mark_fresh(grid_dir: Path, key: str) -> None:
    store.atomic_write_text(Path(grid_dir) / KEY_FILE, key + "\n")
