"""`python -m bench.run grid=NAME [overrides]`: expand a grid, train every cell, write summary, plots, report.

Cells run where `launcher=` says (local: here, one after another; parallel: worker processes; slurm: one job per
cell, bench/launchers.py), each under its lock, so several runners can share a grid; bad input (unknown axis, zero
budget, unwritable or incompatible results folder) fails with one line before anything is written."""
from __future__ import annotations

import sys
from pathlib import Path

import yaml
from omegaconf import DictConfig

from bench import distributed, store
from bench.components import plain, validate_cell
from bench.config import group_options, split_override
from bench.errors import NonFiniteLoss, UserError
from bench.execute import Task, evaluate_base, read_base_metrics, run_cell  # noqa: F401 (public: bench.run.run_cell)
from bench.grid import Cell, expand_grid, mark_invalid
from bench.launchers import build_launcher, check_launcher, drive
from bench.loggers import check_logger
from bench.report import write_report
from bench.summary import build_summary, write_manifest, write_summary
from bench.train import check_budget


def parse_args(argv: list[str]) -> tuple[str, list[str]]:
    grid, rest = None, []
    for item in argv:
        key, value = split_override(item)
        if key == "grid":
            grid = value
        else:
            rest.append(item)
    if grid is None:
        raise UserError(f"no grid given; run python -m bench.run grid=NAME with NAME one of: {', '.join(group_options('grid'))}")
    return grid, rest


def prepare(argv: list[str]) -> tuple[str, DictConfig, list[Cell]]:
    grid_name, overrides = parse_args(argv)
    base, cells = expand_grid(grid_name, overrides)
    for cell in cells:
        validate_cell(cell.cfg)
    mark_invalid(cells)
    if not any(c.skip_reason is None for c in cells):
        reasons = sorted({c.skip_reason for c in cells})
        raise UserError(f"every cell of grid '{grid_name}' is invalid: {'; '.join(reasons)}")
    # Everything that would fail inside a cell fails here instead, before any file is written.
    for cell in cells:
        if cell.skip_reason is None:
            check_budget(cell.cfg)
    check_launcher(base)
    check_logger(base)
    return grid_name, base, cells


def open_results(base: DictConfig, grid_name: str) -> Path:
    """The grid's results folder, refused (UserError, nothing written) if it is not writable or was written in
    another results format; otherwise created and stamped with this version."""
    grid_dir = Path(base.results_dir) / grid_name
    store.check_writable(grid_dir)
    store.check_results_version(grid_dir)
    grid_dir.mkdir(parents=True, exist_ok=True)
    store.write_results_version(grid_dir)
    return grid_dir


def write_grid_meta(grid_name: str, base: DictConfig, cells: list[Cell], grid_dir: Path) -> None:
    """grid.yaml (what the report needs of the grid config) and cells.json (the cells as expanded); written before
    any cell runs, so `python -m bench.report` works on a grid that is still running or whose runner died."""
    b = base.budget
    budget = ", ".join(f"{k}={b[k]}" for k in ("nfe", "device_hours", "iterations") if b.get(k) is not None)
    grid_cfg = {**plain(base.grid), "name": grid_name, "budget_text": budget}
    store.atomic_write_text(grid_dir / "grid.yaml", yaml.safe_dump(grid_cfg, sort_keys=False))
    write_manifest(grid_dir, cells)


def finish(grid_name: str, base, cells: list[Cell], grid_dir: Path, base_metrics: dict | None) -> Path:
    df = build_summary(grid_name, grid_dir, cells, base_metrics)
    write_summary(df, grid_dir)
    write_grid_meta(grid_name, base, cells, grid_dir)
    return write_report(grid_dir)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        grid_name, base, cells = prepare(argv)
        if distributed.active():  # accelerate launch: all ranks train each cell together (bench/distributed.py)
            return distributed.run_grid(grid_name, base, cells, open_results, finish)
        grid_dir = open_results(base, grid_name)
        if base.grid.get("kind", "train") == "fidelity":  # a measurement of estimators, not a training grid
            from bench.fidelity import run_fidelity

            return run_fidelity(grid_name, base, cells[0].overrides, grid_dir)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    valid = [c for c in cells if c.skip_reason is None]
    skipped = [c for c in cells if c.skip_reason is not None]
    for reason in sorted({c.skip_reason for c in skipped}):
        n = sum(c.skip_reason == reason for c in skipped)
        print(f"skipping {n} cell(s): {reason}")
    write_grid_meta(grid_name, base, cells, grid_dir)
    tasks = [Task("base", valid[0]), *(Task("cell", c) for c in valid)]
    try:
        results = drive(build_launcher(base), tasks, grid_dir, poll_s=float(base.launcher.get("poll_s", 10)))
    except KeyboardInterrupt:
        print(f"interrupted; rerun the same command to resume from the cells' checkpoints ({grid_dir})", file=sys.stderr)
        return 130
    results.pop("base", None)
    report = finish(grid_name, base, cells, grid_dir, read_base_metrics(grid_dir))
    failed = {n: store.read_status(grid_dir / n).get("error") or "" for n, s in results.items() if s == "failed"}
    print(f"{len(valid) - len(failed)} cells done, {len(failed)} failed, {len(skipped)} skipped -> {report}")
    for name, error in failed.items():
        print(f"  failed {name}: {error}")
    # A diverged cell (non-finite loss) is a result of the benchmark, reported like any other; a cell that
    # crashed for any other reason is a bug or a broken setup, and the exit code says so.
    crashed = [n for n, e in failed.items() if not e.startswith(NonFiniteLoss.__name__)]
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
