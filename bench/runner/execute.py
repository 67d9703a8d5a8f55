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

from bench.runner import base_eval, distributed, lifeline, store
from bench.runner.components import build_world
from bench.core.errors import Diverged
from bench.runner.grid import BASE_CELL, Cell, resolved_yaml
from bench.runner.locks import CellLock
from bench.runner.loggers import open_logger
from bench.core.meter import ComputeMeter
from bench.core.policy import PolicyCall
from bench.runner.resolve import identity
from bench.training.train import train_cell

SETTLED = ("done", "diverged", "failed")
FINAL = ("done", "diverged")  # results: a rerun keeps them (a failed cell is retried)
IDENTITY_FILE = "identity.json"


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
    """Eval figures of the base model, computed once per grid into <grid>/base/metrics.json (in a data-parallel
    run rank 0 evaluates alone while the others wait: the eval has no collective inside)."""
    if not distributed.is_main():
        distributed.barrier()
        return "done" if base_metrics_path(grid_dir).exists() else "lost"
    try:
        return _evaluate_base_once(cell, grid_dir)
    finally:
        distributed.barrier()


def _evaluate_base_once(cell: Cell, grid_dir: Path) -> str:
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
        policy = world.build_policy()
        with meter.phase("eval"), base_eval.neutrality() as rng:
            metrics = world.evaluate(PolicyCall(policy, meter), folder, "base")
        if lock.lost:
            return "lost"
        base_eval.write_key(folder, cell.cfg, rng["neutral"])  # what lets cells reuse it as their iteration 0
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


class FollowerLock:
    """What a rank that does not write holds (the other ranks of a data-parallel cell, or the ranks a runner
    started under its own lock): the writer's claim, nothing to release."""

    lost = False
    broke = False
    owner = None

    def release(self) -> None:
        pass


@contextmanager
def _claim(cell: Cell, grid_dir: Path, **attempt: Any) -> Iterator[CellLock | str]:
    cell_dir = Path(grid_dir) / cell.name
    status = store.read_status(cell_dir)["status"]
    if status in FINAL:
        yield status
        return
    lock = make_lock(cell.cfg, cell_dir)
    if not lock.acquire():
        yield "locked"
        return
    try:
        # Read again under the lock: another runner may have finished it since the check above.
        status = store.read_status(cell_dir)["status"]
        if status in FINAL:
            yield status
            return
        store.remove_stale_temps(cell_dir)
        store.record_attempt(cell_dir, resume=store.has_checkpoint(cell_dir),
                             job_id=lock.owner.job_id if lock.owner else None, took_over=lock.broke, **attempt)
        yield lock
    finally:
        lock.release()


@contextmanager
def claimed(cell: Cell, grid_dir: Path, held: bool = False, **attempt: Any) -> Iterator[CellLock | FollowerLock | str]:
    """Yield the cell's held lock, or the outcome ("done", "diverged", "locked") when there is nothing for us to
    run. Rank 0 claims for a data-parallel launch and tells the others; `held`: our parent holds the lock."""
    if held:
        yield FollowerLock()
        return
    if not distributed.is_main():
        outcome = distributed.broadcast_object(None)
        yield FollowerLock() if outcome is None else outcome
        return
    with _claim(cell, grid_dir, **attempt) as lock:
        distributed.broadcast_object(lock if isinstance(lock, str) else None)
        yield lock


def run_cell(cell: Cell, grid_dir: Path, position: int = 1, held: bool = False) -> str:
    """Train (or resume) one cell under its lock, recording done / diverged / failed; an error here never touches
    another cell's folder. The one cell lifecycle of every launcher: in a data-parallel launch every rank runs
    it, rank 0 writes (status, identity, metrics, samples, checkpoints), the others keep their own stream."""
    cell_dir = Path(grid_dir) / cell.name
    main = distributed.is_main()
    with claimed(cell, grid_dir, held=held) as lock:
        if isinstance(lock, str):
            return lock
        if main:
            write_identity(cell, cell_dir)
            store.write_status(cell_dir, "running", processes=distributed.world_size())
        distributed.sync_rank_checkpoint(cell_dir)
        logger = open_logger(cell.cfg, cell_dir, cell.name, cell.method) if main else None
        # Every rank takes rank 0's answer, so all evaluate at iteration 0 or none does.
        base = distributed.broadcast_object(base_eval.reusable_base_eval(
            cell.cfg, Path(grid_dir) / BASE_CELL, base_metrics_path(grid_dir)) if main else None)
        if base is not None and not main:  # rank 0 writes the cell's sample sheets
            base = {**base, "samples": []}
        try:
            train_cell(cell.cfg, distributed.rank_cell_dir(cell_dir), position, on_row=logger.log if logger else None,
                       base_eval=base)
        except Diverged as e:  # a result of the benchmark: which quantity went non-finite, and when
            if lock.lost:
                return "lost"
            if main:
                store.write_status(cell_dir, "diverged", error=str(e), quantity=e.quantity, iteration=e.iteration)
            return "diverged"
        except Exception as e:  # a failed cell is recorded; the grid goes on
            if lock.lost:
                return "lost"
            full = store.disk_full(e, cell_dir)
            if full is not None:  # not the cell's fault: stop the run, leave the cell to resume from its checkpoint
                store.note_interrupted(cell_dir, str(full))
                raise full from e
            if main:
                store.atomic_write_text(cell_dir / "error.log", traceback.format_exc())
                store.write_status(cell_dir, "failed", error=f"{type(e).__name__}: {e}")
            if distributed.active():  # the other ranks may wait in a collective: stop the launch (it resumes)
                raise
            return "failed"
        except BaseException:  # Ctrl-C, or submitit's exit on preemption: the next run resumes
            if not lock.lost and main:
                store.write_status(cell_dir, "interrupted")
            raise
        finally:
            if logger is not None:
                logger.close()
        if lock.lost:
            return "lost"
        if main:
            store.write_status(cell_dir, "done")
        distributed.barrier()
        return "done"


def write_identity(cell: Cell, cell_dir: Path) -> None:
    """config.yaml (the resolved config) and identity.json (its hash and semantic part), before training starts:
    a later run with another config compares against them and never resumes this cell's work."""
    store.atomic_write_text(cell_dir / store.CONFIG_FILE, resolved_yaml(cell.cfg))
    ident = cell.identity if cell.identity is not None else identity(cell.cfg)
    store.atomic_write_text(cell_dir / IDENTITY_FILE, json.dumps({"hash": cell.hash, "identity": ident},
                                                                 indent=1, sort_keys=True, default=str))


def read_identity(cell_dir: Path) -> dict[str, Any] | None:
    """The stored {"hash", "identity"} of a cell folder, or None if it has none (never started)."""
    path = Path(cell_dir) / IDENTITY_FILE
    return json.loads(path.read_text()) if path.exists() else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_parallel_command(processes: int, mixed_precision: str = "no") -> list[str]:
    """`accelerate launch` of `processes` ranks on this node. Its --multi_gpu mode is torchrun underneath and starts
    the ranks on CPUs too (bench.runner.distributed then uses gloo), where its --cpu mode would start only one.
    --mixed_precision is the cell's train.mixed_precision (the cell refuses a launch that says otherwise)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1",
            "--num_processes", str(processes), "--main_process_port", str(_free_port()), "--mixed_precision", mixed_precision,
            "--dynamo_backend", "no"]


def run_cell_data_parallel(cell: Cell, grid_dir: Path, processes: int) -> str:
    """Train one cell on `processes` ranks started by `accelerate launch` (bench/runner/distributed.py: sharded prompts,
    averaged gradients, rank 0 writes) while this process holds the cell's lock and watches them."""
    cell_dir = Path(grid_dir) / cell.name
    with claimed(cell, grid_dir, processes=processes) as lock:
        if isinstance(lock, str):
            return lock
        with tempfile.TemporaryDirectory(prefix="bench-cell-") as tmp:
            payload = Path(tmp) / "task.pkl"
            payload.write_bytes(pickle.dumps(Task("cell", cell)))
            precision = str(cell.cfg.train.get("mixed_precision", "no"))
            cmd = [*data_parallel_command(processes, precision), "-m", "bench.runner.execute", str(payload), str(Path(grid_dir).resolve())]
            # Its own session, so stopping it (preemption, Ctrl-C) reaches every rank it started.
            # It dies with this process (a job killed with SIGKILL), and its ranks with it (_data_parallel_rank).
            proc = subprocess.Popen(cmd, start_new_session=True, preexec_fn=lifeline.preexec_die_with_parent)
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
    """One rank of run_cell_data_parallel: the cell lifecycle under the runner's lock (it watches the ranks); the
    grid's summary and report are left to the runner, which sees all cells."""
    lifeline.die_with_parent()  # the `accelerate launch` that started this rank
    task: Task = pickle.loads(Path(payload).read_bytes())
    distributed.init()
    return 0 if run_cell(task.cell, Path(grid_dir), held=True) in FINAL else 1


def run_task(task: Task, grid_dir: Path, position: int = 1, processes: int = 1) -> str:
    if task.kind == "base":
        return run_base(task.cell, grid_dir)
    if processes > 1:
        return run_cell_data_parallel(task.cell, grid_dir, processes)
    return run_cell(task.cell, grid_dir, position)


if __name__ == "__main__":  # a rank under `accelerate launch -m bench.runner.execute TASK.pkl GRID_DIR`
    sys.exit(_data_parallel_rank(Path(sys.argv[1]), Path(sys.argv[2])))
