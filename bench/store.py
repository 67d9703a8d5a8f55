"""Per-cell result files: status, resolved config, metrics.jsonl and checkpoints (DESIGN section 10)."""
from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from bench.errors import UserError

STATUS_FILE, METRICS_FILE, CHECKPOINT_FILE, CONFIG_FILE = "status.json", "metrics.jsonl", "checkpoint.pt", "config.yaml"
LOCK_FILE, RUNS_FILE, VERSION_FILE = "lock", "runs.jsonl", "VERSION"

# The layout of results/<grid>/ (file names, metrics.jsonl rows, status values). Bump it when a change would make
# an older runner or report misread a folder; folders without a VERSION file were written by the foundation
# runner, whose layout is format 1.
RESULTS_FORMAT = 1


def _tmp_name(path: Path) -> Path:
    # pid and thread in the name: concurrent writers of one file (two runners finishing a grid) never share a temp.
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems do not fsync directories; the rename is still atomic
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yields a temp path to write; on success it is fsynced and renamed onto `path` (a reader sees the old or
    the new file, never half of one); on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """Temp file + rename: a reader sees the old or the new file, never half of one."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def remove_stale_temps(folder: Path) -> int:
    """Delete temp files left in `folder` (and its subfolders) by writers killed mid-write; call it only while
    holding the folder's lock, when no live writer can own one."""
    n = 0
    for tmp in Path(folder).rglob(".*.tmp"):
        tmp.unlink(missing_ok=True)
        n += 1
    return n


def bench_version() -> str:
    from bench import __version__

    return __version__


def check_results_version(grid_dir: Path) -> None:
    """Refuse a results folder written in another results format (one-line UserError naming both versions)."""
    path = Path(grid_dir) / VERSION_FILE
    try:
        found = json.loads(path.read_text())
        fmt, by = int(found["results_format"]), found.get("bench_version", "unknown")
    except FileNotFoundError:
        return
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise UserError(f"'{path}' is not a diffrl-bench VERSION file; refusing to write into '{grid_dir}'") from None
    if fmt != RESULTS_FORMAT:
        raise UserError(f"'{grid_dir}' holds results format {fmt} (written by diffrl-bench {by}); this is diffrl-bench "
                        f"{bench_version()} with results format {RESULTS_FORMAT}: use a matching version or another "
                        "results_dir")


def write_results_version(grid_dir: Path) -> None:
    path = Path(grid_dir) / VERSION_FILE
    if not path.exists():
        atomic_write_text(path, json.dumps({"results_format": RESULTS_FORMAT, "bench_version": bench_version()}) + "\n")


def check_writable(folder: Path) -> None:
    """UserError unless `folder` exists as a writable directory or could be created; writes nothing that stays."""
    folder = Path(folder)
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"results folder '{folder}' is not writable: '{probe}' is not a directory")
    try:  # os.access lies for root and on some network filesystems: really try
        fd, name = tempfile.mkstemp(prefix=".write-probe-", suffix=".tmp", dir=probe)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise UserError(f"results folder '{folder}' is not writable: {e.strerror or e} ('{probe}')") from None


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


def append_jsonl(path: Path, row: dict[str, Any]) -> None:
    """Append one JSON line with a single write(2) on an O_APPEND descriptor, then fsync: the line is on disk
    when this returns, and a crash loses at most the line in flight (left torn, without its newline)."""
    data = (json.dumps({k: _clean(v) for k, v in row.items()}) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """All complete rows. A row counts only once its newline is written, so a torn last line (killed mid-write)
    is ignored even when its prefix happens to parse; reading stops at the first undecodable line."""
    try:
        text = Path(path).read_bytes().decode(errors="replace")
    except FileNotFoundError:
        return []
    rows = []
    for line in text.split("\n")[:-1]:  # the piece after the last newline is a line in flight
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break
        if not isinstance(row, dict):
            break
        rows.append(row)
    return rows


def append_metrics(cell_dir: Path, row: dict[str, Any]) -> None:
    """One JSON line per iteration, written and fsynced before the iteration's checkpoint."""
    append_jsonl(Path(cell_dir) / METRICS_FILE, row)


def read_metrics(cell_dir: Path) -> list[dict[str, Any]]:
    """All complete rows of metrics.jsonl; a torn last line (killed mid-write) is ignored."""
    return read_jsonl(Path(cell_dir) / METRICS_FILE)


def record_attempt(cell_dir: Path, **info: Any) -> None:
    """Append who ran the cell when to runs.jsonl: provenance across resumes, requeues and several runners."""
    append_jsonl(Path(cell_dir) / RUNS_FILE, {"host": socket.gethostname(), "pid": os.getpid(),
                                              "started": time.strftime("%Y-%m-%dT%H:%M:%S"), **info})


def truncate_metrics(cell_dir: Path, last_iteration: int) -> None:
    """Keep only rows up to the checkpointed iteration, so a resumed run never duplicates one."""
    rows = [r for r in read_metrics(cell_dir) if r["iteration"] <= last_iteration]
    atomic_write_text(Path(cell_dir) / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in rows))


def save_checkpoint(cell_dir: Path, state: dict[str, Any]) -> None:
    with atomic_path(Path(cell_dir) / CHECKPOINT_FILE) as tmp:
        torch.save(state, tmp)


def load_checkpoint(cell_dir: Path) -> dict[str, Any] | None:
    path = Path(cell_dir) / CHECKPOINT_FILE
    return torch.load(path, map_location="cpu", weights_only=False) if path.exists() else None
