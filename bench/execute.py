"""One unit of work of a grid (a cell, or the base model's eval) run under its lock; every launcher calls this.

A Slurm job whose cell has several processes (launcher.processes_per_cell, default: its GPUs) trains it
data-parallel under `accelerate launch` (run_cell_data_parallel). Outcomes: "done" and "failed" settle a unit;
"locked" (another live runner holds it) and "lost" (our lock was broken while we ran, or the process running it
died) leave it for the runner to retry once it is free.
"""
from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from omegaconf import DictConfig

from bench import store
from bench.grid import BASE_CELL, Cell, resolved_yaml
from bench.locks import CellLock

SETTLED = ("done", "failed")


@dataclass
class Task:
    """A unit a launcher runs: `kind` "base" evaluates the untrained model once per grid, "cell" trains one cell."""

    kind: str
    cell: Cell

    @property
    def name(self) -> str:
        return BASE_CELL if self.kind == "base" else self.cell.name


def task_dir(task: Task, grid_dir: Path) -> Path:
    return Path(grid_dir) / task.name


def make_lock(cfg: DictConfig, folder: Path) -> CellLock:
    lock_cfg = cfg.get("lock") or {}
    return CellLock(Path(folder) / store.LOCK_FILE, heartbeat_s=float(lock_cfg.get("heartbeat_s", 30)),
                    stale_after_s=float(lock_cfg.get("stale_after_s", 600)))


def base_metrics_path(grid_dir: Path) -> Path:
    return Path(grid_dir) / BASE_CELL / "metrics.json"


def read_base_metrics(grid_dir: Path) -> dict[str, Any] | None:
    path = base_metrics_path(grid_dir)
    return json.loads(path.read_text()) if path.exists() else None


def run_base(cell: Cell, grid_dir: Path) -> str:
    """Eval figures of the base model, computed once per grid into <grid>/base/metrics.json."""
    from bench.components import build_world
    from bench.meter import ComputeMeter
    from bench.policy import PolicyCall

    folder = Path(grid_dir) / BASE_CELL
    if base_metrics_path(grid_dir).exists():
        return "done"
    lock = make_lock(cell.cfg, folder)
    if not lock.acquire():
        return "locked"
    try:
        if base_metrics_path(grid_dir).exists():
            return "done"
        store.remove_stale_temps(folder)
        world = build_world(cell.cfg)
        meter = ComputeMeter(device=world.device)
        with meter.phase("eval"):
            metrics = world.evaluate(PolicyCall(world.build_policy(), meter), folder, "base")
        if lock.lost:
            return "lost"
        store.atomic_write_text(base_metrics_path(grid_dir), json.dumps(metrics, indent=1))
        store.write_status(folder, "done")
        return "done"
    finally:
        lock.release()


def evaluate_base(cell: Cell, grid_dir: Path) -> dict[str, Any]:
    """The base model's eval figures, computing them here if no other runner has (kept for callers of bench.run)."""
    run_base(cell, grid_dir)
    metrics = read_base_metrics(grid_dir)
    if metrics is None:
        raise RuntimeError(f"the base model eval in {Path(grid_dir) / BASE_CELL} is held by another runner")
    return metrics


@contextmanager
def claimed(cell: Cell, grid_dir: Path, **attempt: Any) -> Iterator[CellLock | str]:
    """Yield the cell's held lock, or the outcome ("done", "locked") when there is nothing for us to run."""
    cell_dir = Path(grid_dir) / cell.name
    if store.read_status(cell_dir)["status"] == "done":
        yield "done"
        return
    lock = make_lock(cell.cfg, cell_dir)
    if not lock.acquire():
        yield "locked"
        return
    try:
        # Read again under the lock: another runner may have finished it since the check above.
        if store.read_status(cell_dir)["status"] == "done":
            yield "done"
            return
        store.remove_stale_temps(cell_dir)
        store.record_attempt(cell_dir, resume=(cell_dir / store.CHECKPOINT_FILE).exists(),
                             job_id=lock.owner.job_id if lock.owner else None, took_over=lock.broke, **attempt)
        yield lock
    finally:
        lock.release()


def run_cell(cell: Cell, grid_dir: Path, position: int = 1) -> str:
    """Train (or resume) one cell under its lock, recording done/failed; an error here never touches another
    cell's folder."""
    from bench.loggers import open_logger
    from bench.train import train_cell

    cell_dir = Path(grid_dir) / cell.name
    with claimed(cell, grid_dir) as lock:
        if isinstance(lock, str):
            return lock
        store.atomic_write_text(cell_dir / store.CONFIG_FILE, resolved_yaml(cell.cfg))
        store.write_status(cell_dir, "running")
        logger = open_logger(cell.cfg, cell_dir, cell.name, cell.method)
        try:
            train_cell(cell.cfg, cell_dir, position, on_row=logger.log if logger else None)
        except Exception as e:  # a failed cell is a result; the grid goes on
            if lock.lost:
                return "lost"
            store.atomic_write_text(cell_dir / "error.log", traceback.format_exc())
            store.write_status(cell_dir, "failed", error=f"{type(e).__name__}: {e}")
            return "failed"
        except BaseException:  # Ctrl-C, or submitit's exit on preemption: the next run resumes
            if not lock.lost:
                store.write_status(cell_dir, "interrupted")
            raise
        finally:
            if logger is not None:
                logger.close()
        if lock.lost:
            return "lost"
        store.write_status(cell_dir, "done")
        return "done"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_parallel_command(processes: int) -> list[str]:
    """`accelerate launch` of `processes` ranks on this node. Its --multi_gpu mode is torchrun underneath and starts
    the ranks on CPUs too (bench.distributed then uses gloo), where its --cpu mode would start only one."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1",
            "--num_processes", str(processes), "--main_process_port", str(_free_port()), "--mixed_precision", "no",
            "--dynamo_backend", "no"]


def run_cell_data_parallel(cell: Cell, grid_dir: Path, processes: int) -> str:
    """Train one cell on `processes` ranks started by `accelerate launch` (bench/distributed.py: sharded prompts,
    averaged gradients, rank 0 writes) while this process holds the cell's lock and watches them."""
    cell_dir = Path(grid_dir) / cell.name
    with claimed(cell, grid_dir, processes=processes) as lock:
        if isinstance(lock, str):
            return lock
        with tempfile.TemporaryDirectory(prefix="bench-cell-") as tmp:
            payload = Path(tmp) / "task.pkl"
            payload.write_bytes(pickle.dumps(Task("cell", cell)))
            cmd = [*data_parallel_command(processes), "-m", "bench.execute", str(payload), str(Path(grid_dir).resolve())]
            # Its own session, so stopping it (preemption, Ctrl-C) reaches every rank it started.
            proc = subprocess.Popen(cmd, start_new_session=True)
            try:
                rc = proc.wait()
            except BaseException:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                if not lock.lost:
                    store.write_status(cell_dir, "interrupted")
                raise
        if lock.lost:
            return "lost"
        status = store.read_status(cell_dir)
        if rc != 0 and status["status"] != "failed":
            store.write_status(cell_dir, "failed", error=f"data-parallel launch over {processes} processes exited "
                                                         f"with {rc} (status was {status['status']})")
        return "done" if rc == 0 and status["status"] == "done" else "failed"


def _data_parallel_rank(payload: Path, grid_dir: Path) -> int:
    """One rank of run_cell_data_parallel: bench.distributed's grid driver over this single cell. The grid's own
    summary and report are left to the runner, which sees all cells."""
    from bench import distributed

    task: Task = pickle.loads(Path(payload).read_bytes())
    return distributed.run_grid(Path(grid_dir).name, task.cell.cfg, [task.cell], lambda base, name: Path(grid_dir),
                                lambda *args: Path(grid_dir) / task.cell.name)


def run_task(task: Task, grid_dir: Path, position: int = 1, processes: int = 1) -> str:
    if task.kind == "base":
        return run_base(task.cell, grid_dir)
    if processes > 1:
        return run_cell_data_parallel(task.cell, grid_dir, processes)
    return run_cell(task.cell, grid_dir, position)


if __name__ == "__main__":  # a rank under `accelerate launch -m bench.execute TASK.pkl GRID_DIR`
    sys.exit(_data_parallel_rank(Path(sys.argv[1]), Path(sys.argv[2])))
