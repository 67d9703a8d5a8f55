"""`python -m bench.run grid=NAME [overrides]`: expand a grid, train every cell, write summary, plots, report."""
from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import yaml
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from bench import store
from bench.components import build_world, plain, validate_cell
from bench.config import group_options, split_override
from bench.errors import UserError
from bench.grid import BASE_CELL, Cell, expand_grid, mark_invalid, resolved_yaml
from bench.meter import ComputeMeter
from bench.policy import PolicyCall
from bench.report import write_report
from bench.summary import build_summary, write_summary
from bench.train import train_cell


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


def prepare(argv: list[str]) -> tuple[str, object, list[Cell]]:
    grid_name, overrides = parse_args(argv)
    base, cells = expand_grid(grid_name, overrides)
    for cell in cells:
        validate_cell(cell.cfg)
    mark_invalid(cells)
    if not any(c.skip_reason is None for c in cells):
        reasons = sorted({c.skip_reason for c in cells})
        raise UserError(f"every cell of grid '{grid_name}' is invalid: {'; '.join(reasons)}")
    return grid_name, base, cells


def evaluate_base(cell: Cell, grid_dir: Path) -> dict:
    """Eval figures of the base model, computed once per grid (cached in <grid>/base/metrics.json)."""
    path = grid_dir / BASE_CELL / "metrics.json"
    if path.exists():
        return json.loads(path.read_text())
    world = build_world(cell.cfg)
    meter = ComputeMeter(device=world.device)
    with meter.phase("eval"):
        metrics = world.evaluate(PolicyCall(world.build_policy(), meter), grid_dir / BASE_CELL, "base")
    store.atomic_write_text(path, json.dumps(metrics, indent=1))
    return metrics


def run_cell(cell: Cell, grid_dir: Path) -> str:
    """Train one cell, recording done/failed; an error here never touches another cell's folder."""
    cell_dir = grid_dir / cell.name
    if store.read_status(cell_dir)["status"] == "done":
        return "done"
    cell_dir.mkdir(parents=True, exist_ok=True)
    store.atomic_write_text(cell_dir / store.CONFIG_FILE, resolved_yaml(cell.cfg))
    store.write_status(cell_dir, "running")
    try:
        train_cell(cell.cfg, cell_dir)
    except KeyboardInterrupt:
        store.write_status(cell_dir, "interrupted")
        raise
    except Exception as e:  # a failed cell is a result; the grid goes on
        store.atomic_write_text(cell_dir / "error.log", traceback.format_exc())
        store.write_status(cell_dir, "failed", error=f"{type(e).__name__}: {e}")
        return "failed"
    store.write_status(cell_dir, "done")
    return "done"


def finish(grid_name: str, base, cells: list[Cell], grid_dir: Path, base_metrics: dict | None) -> Path:
    df = build_summary(grid_name, grid_dir, cells, base_metrics)
    write_summary(df, grid_dir)
    b = base.budget
    budget = ", ".join(f"{k}={b[k]}" for k in ("nfe", "device_hours", "iterations") if b.get(k) is not None)
    grid_cfg = {**plain(base.grid), "name": grid_name, "budget_text": budget}
    store.atomic_write_text(grid_dir / "grid.yaml", yaml.safe_dump(grid_cfg, sort_keys=False))
    return write_report(grid_dir)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        grid_name, base, cells = prepare(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    grid_dir = Path(base.results_dir) / grid_name
    grid_dir.mkdir(parents=True, exist_ok=True)
    valid = [c for c in cells if c.skip_reason is None]
    skipped = [c for c in cells if c.skip_reason is not None]
    for reason in sorted({c.skip_reason for c in skipped}):
        n = sum(c.skip_reason == reason for c in skipped)
        print(f"skipping {n} cell(s): {reason}")
    base_metrics = evaluate_base(valid[0], grid_dir)
    results = {}
    for cell in tqdm(valid, desc=f"grid {grid_name}", unit="cell", position=0, dynamic_ncols=True, disable=None):
        results[cell.name] = run_cell(cell, grid_dir)
    report = finish(grid_name, base, cells, grid_dir, base_metrics)
    failed = [n for n, s in results.items() if s == "failed"]
    print(f"{len(valid) - len(failed)} cells done, {len(failed)} failed, {len(skipped)} skipped -> {report}")
    for name in failed:
        print(f"  failed {name}: {store.read_status(grid_dir / name).get('error')}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
