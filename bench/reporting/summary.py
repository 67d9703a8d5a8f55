"""Collects per-cell results into one table: results/<grid>/summary.parquet.

The table covers every cell of the grid folder, not just the cells of the invocation that writes it: the union of
cells.json (which every invocation extends, never truncates) and the cell folders on disk. A restricted rerun
(`sampler=flow_sde` on a finished grid) therefore keeps the other cells in the summary and the report. Each cell
gets a `state`: finished, diverged, failed, unfinished (with the iteration it got to), pending (not started) or
skipped. Cells of one method whose resolved configs differ (a rerun with another lr) are told apart by the keys
that differ, so they are never pooled in one row.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from bench.core.lazy import lazy_module
from bench.runner import store
from bench.runner.grid import BASE_CELL, Cell

pd = lazy_module("pandas")

KEEP = ("iteration", "nfe", "optimizer_steps", "device_hours", "wall_s", "eval_reward", "eval_accuracy", "eval_heldout_accuracy",
        "eval_diversity", "eval_nearest_real")
MANIFEST_FILE = "cells.json"
IDENTITY_FILE = "identity.json"  # written by the runner beside config.yaml: {"hash", "identity"}
BASE_METRICS = Path(BASE_CELL) / "metrics.json"
# How a cell ran, not what it is: left out when telling configs apart.
RUNNER_KEYS = ("seed", "results_dir", "launcher", "logger", "lock", "hydra", "world.threads", "world.device")
DIVERGED_ERRORS = ("NonFiniteLoss", "NonFinite", "Diverged")


def cell_state(status: dict[str, Any], last_iteration: int | None) -> tuple[str, str]:
    """(state, text) of a cell from its status.json and the last iteration in its metrics.jsonl."""
    st = status.get("status", "pending")
    error = status.get("error") or ""
    if st == "done":
        return "finished", "finished"
    if st == "diverged" or (st == "failed" and error.startswith(DIVERGED_ERRORS)):
        return "diverged", f"diverged: {error}" if error else "diverged"
    if st == "failed":
        return "failed", f"failed: {error}" if error else "failed"
    if last_iteration is None and st == "pending":
        return "pending", "not started"
    return "unfinished", f"unfinished at iteration {last_iteration if last_iteration is not None else 0}"


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as dotted keys (an empty mapping stays one value)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def flat_config(path: Path) -> dict[str, Any]:
    """A cell's resolved config.yaml as dotted keys, without the runner's keys ({} if there is none)."""
    try:
        cfg = yaml.safe_load(Path(path).read_text()) or {}
    except (FileNotFoundError, yaml.YAMLError):
        return {}
    return {k: v for k, v in flatten(cfg).items() if k not in RUNNER_KEYS and k.split(".")[0] not in RUNNER_KEYS}


def cell_identity(folder: Path) -> dict[str, Any]:
    """What a cell computes, as dotted keys without its seed: identity.json's semantic config where the runner
    wrote one (bench.runner.resolve.identity), else config.yaml without the runner's keys."""
    try:
        ident = json.loads((Path(folder) / IDENTITY_FILE).read_text())["identity"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
        return flat_config(Path(folder) / store.CONFIG_FILE)
    return {k: v for k, v in flatten(ident).items() if k != "seed"}


def _discovered(grid_dir: Path, known: set[str]) -> list[Cell]:
    """Cell folders on disk that no manifest lists (written by another runner or an older invocation)."""
    out = []
    for d in sorted(p for p in Path(grid_dir).iterdir() if p.is_dir()):
        if d.name in known or d.name == BASE_CELL or d.name.startswith(".") or d.name == "cache":
            continue
        if not any((d / f).exists() for f in (store.CONFIG_FILE, store.STATUS_FILE, store.METRICS_FILE)):
            continue
        cfg = flat_config(d / store.CONFIG_FILE)
        try:
            seed = int((yaml.safe_load((d / store.CONFIG_FILE).read_text()) or {}).get("seed", -1))
        except (FileNotFoundError, yaml.YAMLError, TypeError, ValueError):
            seed = -1
        method = re.sub(rf"-seed{seed}(?=$|-)", "", d.name) if seed >= 0 else d.name
        labels = {g: str(cfg[f"{g}.name"]) for g in ("sampler", "estimator", "objective") if f"{g}.name" in cfg}
        out.append(Cell(d.name, method, seed, {}, [], None, None, labels))
    return out


def all_cells(grid_dir: Path, cells: list[Cell] | None = None) -> list[Cell]:
    """The invocation's cells, then every other cell cells.json lists, then any other cell folder on disk."""
    merged: dict[str, Cell] = {c.name: c for c in (read_manifest(grid_dir) or [])}
    merged.update({c.name: c for c in cells or []})
    return [*merged.values(), *_discovered(grid_dir, set(merged))]


def seed_derived_keys(names: list[str], configs: dict[str, dict], seeds: dict[str, int]) -> set[str]:
    """Keys named *seed whose value is a function of the seed, distinct per seed, across a method's cells
    (`${derived_seed:${seed},K}`): the seed's own random streams, not a difference in config. Other keys always
    tell configs apart (a rerun with another lr on another seed is another config)."""
    if len({seeds[n] for n in names}) < 2:
        return set()
    out = set()
    for k in {k for n in names for k in configs[n] if k.endswith("seed")}:
        by_seed: dict[int, set] = {}
        for n in names:
            by_seed.setdefault(seeds[n], set()).add(repr(configs[n].get(k)))
        if all(len(v) == 1 for v in by_seed.values()) and len(set().union(*by_seed.values())) == len(by_seed):
            out.add(k)
    return out


def _distinguish(rows: list[dict], configs: dict[str, dict]) -> None:
    """Rename methods whose cells ran different configs: `method [key=value, ...]` by the keys that differ."""
    by_method: dict[str, list[str]] = {}
    seeds = {r["cell"]: r["seed"] for r in rows}
    for r in rows:
        if r["cell"] in configs and configs[r["cell"]]:
            by_method.setdefault(r["method"], [])
            if r["cell"] not in by_method[r["method"]]:
                by_method[r["method"]].append(r["cell"])
    rename: dict[str, str] = {}
    for method, names in by_method.items():
        keys = sorted({k for a in names for b in names for k in set(configs[a]) | set(configs[b])
                       if configs[a].get(k) != configs[b].get(k)} - seed_derived_keys(names, configs, seeds))
        if keys:
            for n in names:
                rename[n] = f"{method} [{', '.join(f'{k}={configs[n].get(k)}' for k in keys)}]"
    for r in rows:
        if r["cell"] in rename:
            r["method"] = rename[r["cell"]]


def build_summary(grid_name: str, grid_dir: Path, cells: list[Cell], base_metrics: dict | None) -> pd.DataFrame:
    """One row per cell and eval point (one row for a cell without evals: skipped, pending, failed early) and one
    for the base model, over every cell of the grid folder (all_cells)."""
    grid_dir = Path(grid_dir)
    rows: list[dict] = []
    if base_metrics is None:
        base_metrics = read_base_metrics(grid_dir)
    if base_metrics is not None:
        rows.append({"grid": grid_name, "cell": BASE_CELL, "method": BASE_CELL, "seed": -1, "status": "done",
                     "state": "finished", "state_text": "finished", "iteration": 0, "nfe": 0, "device_hours": 0.0,
                     "wall_s": 0.0, **base_metrics})
    configs: dict[str, dict] = {}
    for cell in all_cells(grid_dir, cells):
        ident = {"grid": grid_name, "cell": cell.name, "method": cell.method, "seed": cell.seed, "stage": cell.stage,
                 **cell.labels, **{f"axis:{k}": str(v) for k, v in cell.axes.items()},
                 **{f"tune:{k}": str(v) for k, v in cell.setting.items()}}
        if cell.skip_reason:
            rows.append({**ident, "status": "skipped", "state": "skipped", "state_text": "skipped",
                         "reason": cell.skip_reason})
            continue
        folder = grid_dir / cell.name
        configs[cell.name] = cell_identity(folder)
        st = store.read_status(folder)
        metrics = store.read_metrics(folder)
        state, text = cell_state(st, int(metrics[-1]["iteration"]) if metrics else None)
        common = {**ident, "status": st["status"], "state": state, "state_text": text, "reason": st.get("error"),
                  "last_iteration": int(metrics[-1]["iteration"]) if metrics else None}
        evals = [r for r in metrics if "eval_reward" in r]
        if not evals:
            rows.append(common)
        for r in evals:
            rows.append({**common, **{k: r.get(k) for k in KEEP},
                         **{k: v for k, v in r.items() if k.startswith("eval_") and k not in KEEP}})
    _distinguish(rows, configs)
    df = pd.DataFrame(rows)
    # Every column the report reads exists even when no cell reached an eval (e.g. all failed on missing weights).
    for col in ("sampler", "estimator", "objective", "reason", "state", "state_text", "last_iteration", "stage", *KEEP):
        if col not in df:
            df[col] = None
    return df


def write_summary(df: pd.DataFrame, grid_dir: Path) -> Path:
    path = Path(grid_dir) / "summary.parquet"
    with store.atomic_path(path) as tmp:  # two runners finishing one grid both write it
        df.to_parquet(tmp, index=False)
    return path


def _entry(c: Cell) -> dict[str, Any]:
    return {"name": c.name, "method": c.method, "seed": c.seed, "axes": {k: str(v) for k, v in c.axes.items()},
            "labels": c.labels, "skip_reason": c.skip_reason, "stage": c.stage,
            "setting": {k: v if isinstance(v, (int, float, bool)) else str(v) for k, v in c.setting.items()}}


def write_manifest(grid_dir: Path, cells: list[Cell]) -> Path:
    """The grid's cells (name, method, seed, axes, labels, skip reason), so `python -m bench.report` can rebuild
    the summary from the cell folders without composing configs again. It is extended, never truncated: cells an
    earlier invocation listed stay listed (this invocation's entries replace theirs by name)."""
    path = Path(grid_dir) / MANIFEST_FILE
    merged = {c.name: _entry(c) for c in (read_manifest(grid_dir) or [])}
    merged.update({c.name: _entry(c) for c in cells})
    store.atomic_write_text(path, json.dumps(list(merged.values()), indent=1))
    return path


def read_manifest(grid_dir: Path) -> list[Cell] | None:
    path = Path(grid_dir) / MANIFEST_FILE
    if not path.exists():
        return None
    return [Cell(d["name"], d["method"], int(d["seed"]), d["axes"], [], None, d.get("skip_reason"), d.get("labels") or {},
                 stage=d.get("stage", "report"), setting=d.get("setting") or {})
            for d in json.loads(path.read_text())]


def read_base_metrics(grid_dir: Path) -> dict[str, Any] | None:
    """The base model's eval figures from <grid>/base/metrics.json (None before the base eval ran)."""
    path = Path(grid_dir) / BASE_METRICS
    return json.loads(path.read_text()) if path.exists() else None


def refresh_summary(grid_dir: Path, grid_name: str) -> Path | None:
    """Rebuild summary.parquet from the grid folder (None if it holds neither a manifest nor a cell folder)."""
    if read_manifest(grid_dir) is None and not _discovered(Path(grid_dir), set()):
        return None
    return write_summary(build_summary(grid_name, Path(grid_dir), [], None), Path(grid_dir))
