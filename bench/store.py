"""Per-cell result files: status, resolved config, metrics.jsonl and checkpoints (DESIGN section 10)."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

STATUS_FILE, METRICS_FILE, CHECKPOINT_FILE, CONFIG_FILE = "status.json", "metrics.jsonl", "checkpoint.pt", "config.yaml"


def atomic_write_text(path: Path, text: str) -> None:
    """Temp file + rename: a reader sees the old or the new file, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_status(cell_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((Path(cell_dir) / STATUS_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {"status": "pending"}


def write_status(cell_dir: Path, status: str, **extra: Any) -> None:
    atomic_write_text(Path(cell_dir) / STATUS_FILE, json.dumps({"status": status, **extra}, indent=1))


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep them visible as strings
    return v


def append_metrics(cell_dir: Path, row: dict[str, Any]) -> None:
    """One JSON line per iteration, flushed and fsynced so a crash loses at most the line in flight."""
    with open(Path(cell_dir) / METRICS_FILE, "a") as f:
        f.write(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_metrics(cell_dir: Path) -> list[dict[str, Any]]:
    """All complete rows; a torn last line (killed mid-write) is ignored."""
    path = Path(cell_dir) / METRICS_FILE
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def truncate_metrics(cell_dir: Path, last_iteration: int) -> None:
    """Keep only rows up to the checkpointed iteration, so a resumed run never duplicates one."""
    rows = [r for r in read_metrics(cell_dir) if r["iteration"] <= last_iteration]
    atomic_write_text(Path(cell_dir) / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in rows))


def save_checkpoint(cell_dir: Path, state: dict[str, Any]) -> None:
    path = Path(cell_dir) / CHECKPOINT_FILE
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(cell_dir: Path) -> dict[str, Any] | None:
    path = Path(cell_dir) / CHECKPOINT_FILE
    return torch.load(path, map_location="cpu", weights_only=False) if path.exists() else None
