"""Where a grid's units run: launcher=local (one after another, in this process), launcher=parallel (worker
processes on this machine) or launcher=slurm (one Slurm job per unit, through submitit).

The runner composes cell configs with Hydra's compose API (so it can validate names and fail with one line), not
with @hydra.main, so Hydra's Launcher plugins (hydra-submitit-launcher is a thin wrapper around submitit) cannot
take over; the launchers here call submitit directly and keep hydra-submitit-launcher's config keys
(experiments/launcher/slurm.yaml). Every launcher runs units through bench.runner.execute.run_task, which takes the
unit's lock, so runners and jobs that overlap never run a cell twice.
"""
from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Protocol

from omegaconf import DictConfig
from tqdm.auto import tqdm

from bench.runner import distributed, lifeline, store
from bench.core.errors import UserError
from bench.core.threads import cap_threads
from bench.runner.execute import FINAL, SETTLED, Task, base_metrics_path, make_lock, run_task, task_dir

LAUNCHERS = ("local", "parallel", "slurm")


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no affinity API
        return os.cpu_count() or 1


class Launcher(Protocol):
    def run(self, tasks: list[Task], grid_dir: Path) -> dict[str, str]:
        """Run these units; an outcome per unit name (see bench.runner.execute)."""


def _guarded(task: Task, grid_dir: Path, position: int = 1) -> str:
    """run_task, with an unexpected error (outside training, which run_cell records itself) reported as "lost" so
    the runner retries the unit a bounded number of times instead of stopping the grid."""
    try:
        return run_task(task, grid_dir, position)
    except Exception as e:
        full = store.disk_full(e, task_dir(task, grid_dir))
        if full is not None:  # every unit would fail the same way: stop the run (bench.run exits 3)
            raise full from e
        print(f"error running {task.name}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return "lost"


class LocalLauncher:
    """Units one after another in this process (the default)."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg

    def run(self, tasks: list[Task], grid_dir: Path) -> dict[str, str]:
        out = {t.name: _guarded(t, grid_dir) for t in tasks if t.kind == "base"}
        cells = [t for t in tasks if t.kind != "base"]
        for t in tqdm(cells, desc=f"grid {Path(grid_dir).name}", unit="cell", position=0, dynamic_ncols=True,
                      disable=None):
            out[t.name] = _guarded(t, grid_dir)
        return out


# What the fork server imports once for every worker (ImportError: skipped): the bench, torch, the torch._dynamo
# that torch.optim imports on a first optimizer (1-2 s), scikit-learn's judge models. A spawned worker paid ~5 s
# of imports each, on the cores the cells need.
PRELOAD = ("bench.runner.execute", "torch._dynamo", "sklearn.neural_network", "sklearn.svm")


def worker_context() -> multiprocessing.context.BaseContext:
    """forkserver where the platform has it (Linux, macOS), preloading PRELOAD; spawn elsewhere. Never plain fork:
    the runner's threads (lock heartbeats, lifeline) and torch's pools do not survive a fork."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(list(PRELOAD))
        return ctx
    return multiprocessing.get_context("spawn")


def _init_worker(threads: int, runner: int) -> None:
    # A worker dies with its runner: a runner killed with SIGKILL must not leave workers taking queued cells
    # (forked by the fork server, its parent is the server, which itself dies with the runner).
    lifeline.die_with(runner)
    # Each worker gets cores // workers threads for torch, numpy's BLAS (the judges) and OpenMP, so workers x threads
    # never exceeds the cores: oversubscribed pools spin and slow every worker down. A world with its own
    # `threads` caps the same pools to that (bench/worlds/base.py), in every launcher.
    cap_threads(threads)


def _stop(workers: list[multiprocessing.process.BaseProcess], grace_s: float = 10.0) -> None:
    for w in workers:
        w.terminate()
    deadline = time.monotonic() + grace_s
    for w in workers:
        w.join(max(0.0, deadline - time.monotonic()))
        if w.is_alive():
            w.kill()
            w.join()


class ParallelLauncher:
    """`workers` spawned processes on this machine, each with cores // workers threads."""

    def __init__(self, cfg: DictConfig):
        self.workers = int(cfg.launcher.get("workers") or available_cores())
        threads = cfg.launcher.get("threads_per_worker")
        self.threads = int(threads) if threads else max(1, available_cores() // self.workers)

    def run(self, tasks: list[Task], grid_dir: Path) -> dict[str, str]:
        cells = [t for t in tasks if t.kind != "base"]
        lifeline.hold_on_children()  # the fork server and workers die with this runner from their `import bench` on
        ctx = worker_context()
        if cells and ctx.get_start_method() == "forkserver":
            # Started now, the server imports PRELOAD on one core while the base eval below runs on the other.
            multiprocessing.forkserver.ensure_running()
        # The base eval first, here: it builds the shared caches (pretrained model, judges) once, before the
        # workers would each build them.
        out = {t.name: _guarded(t, grid_dir) for t in tasks if t.kind == "base"}
        if not cells:
            return out
        workers = min(self.workers, len(cells))
        print(f"launcher=parallel: {len(cells)} cell(s) on {workers} worker(s) x {self.threads} thread(s)", flush=True)
        start = time.perf_counter()
        pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                   initargs=(self.threads, os.getpid()))
        try:
            futures = {pool.submit(_guarded, t, grid_dir, 1 + i % workers): t for i, t in enumerate(cells)}
            for k, f in enumerate(as_completed(futures), 1):
                t = futures[f]
                try:
                    out[t.name] = f.result()
                except store.DiskFull:
                    raise
                except Exception as e:  # the worker process died (killed, out of memory)
                    print(f"worker running {t.name} died: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                    out[t.name] = "lost"
                print(f"[{k}/{len(cells)}] {t.name}: {out[t.name]} ({time.perf_counter() - start:.0f} s)", flush=True)
        except BaseException:
            # Ctrl-C, a full disk: stop the workers now rather than after their cells (each resumes from its
            # checkpoint on the next run, as after a kill).
            pool.shutdown(wait=False, cancel_futures=True)
            _stop(multiprocessing.active_children())
            raise
        pool.shutdown(wait=True)
        return out


class CellJob:
    """The callable a Slurm job runs; submitit requeues it on preemption or timeout (checkpoint() below), and the
    requeued job resumes the cell from its last checkpoint. With processes > 1 the cell trains data-parallel
    under `accelerate launch` inside the job."""

    def __init__(self, cwd: str, processes: int = 1):
        self.cwd = cwd  # relative paths in the config (results_dir) mean the submitting directory
        self.processes = processes

    def __call__(self, task: Task, grid_dir: str) -> str:
        os.chdir(self.cwd)
        return run_task(task, Path(grid_dir), processes=self.processes)

    def checkpoint(self, task: Task, grid_dir: str) -> Any:
        import submitit

        # Nothing to save here: the training loop checkpoints itself; resubmitting the same call resumes it.
        return submitit.helpers.DelayedSubmission(self, task, grid_dir)


class SlurmLauncher:
    """One job per unit, submitted as a job array through submitit (cluster=local: submitit's local executor,
    for tests and workstations)."""

    def __init__(self, cfg: DictConfig):
        self.lc = cfg.launcher
        self.processes = processes_per_cell(cfg)

    def executor(self, grid_dir: Path) -> Any:
        import submitit

        lc = self.lc
        folder = lc.get("submitit_folder") or str(Path(grid_dir) / ".submitit" / "%j")
        params: dict[str, Any] = {"timeout_min": int(lc.timeout_min), "nodes": int(lc.nodes),
                                  "tasks_per_node": int(lc.tasks_per_node), "gpus_per_node": int(lc.gpus_per_node or 0),
                                  "stderr_to_stdout": bool(lc.stderr_to_stdout)}
        if str(lc.cluster) == "local":
            # The local executor directly: through AutoExecutor it cannot take signal_delay_s.
            ex = submitit.LocalExecutor(folder=folder, max_num_timeout=int(lc.max_num_timeout))
            ex.update_parameters(**params, signal_delay_s=int(lc.signal_delay_s))
            return ex
        ex = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=int(lc.max_num_timeout))
        params["name"] = lc.get("job_name") or f"bench-{Path(grid_dir).name}"
        if lc.get("cpus_per_task") is not None:
            params["cpus_per_task"] = int(lc.cpus_per_task)
        if lc.get("mem_gb") is not None:
            params["mem_gb"] = float(lc.mem_gb)
        for key in ("partition", "qos", "account", "constraint", "comment", "exclude", "signal_delay_s",
                    "array_parallelism"):
            if lc.get(key) is not None:
                params[f"slurm_{key}"] = lc[key]
        if lc.get("additional_parameters"):
            params["slurm_additional_parameters"] = dict(lc.additional_parameters)
        if lc.get("setup"):
            params["slurm_setup"] = list(lc.setup)
        ex.update_parameters(**params)
        return ex

    def run(self, tasks: list[Task], grid_dir: Path) -> dict[str, str]:
        grid_dir = Path(grid_dir).resolve()
        ex = self.executor(grid_dir)
        jobs = ex.map_array(CellJob(os.getcwd(), self.processes), tasks, [str(grid_dir)] * len(tasks))
        print(f"launcher=slurm ({self.lc.cluster}): submitted {len(jobs)} job(s): "
              f"{', '.join(f'{t.name}={j.job_id}' for t, j in zip(tasks, jobs))}", flush=True)
        out = {}
        for t, job in zip(tasks, jobs):
            try:
                out[t.name] = job.result()
            except Exception as e:  # the job failed or was cancelled; its log is in the submitit folder
                first = str(e).strip().splitlines()
                print(f"job {job.job_id} ({t.name}) ended without a result: {type(e).__name__}: "
                      f"{first[0] if first else ''} (logs: {job.paths.stdout.parent})", file=sys.stderr, flush=True)
                out[t.name] = "lost"
        return out


def check_launcher(cfg: DictConfig) -> None:
    """UserError for a launcher that cannot work, before anything is written."""
    lc = cfg.get("launcher")
    name = str(lc.get("name")) if lc else "local"
    if name not in LAUNCHERS:
        raise UserError(f"unknown launcher '{name}'; valid: {', '.join(LAUNCHERS)}")
    if name == "parallel":
        for key in ("workers", "threads_per_worker"):
            v = lc.get(key)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise UserError(f"launcher.{key}={v} must be a positive integer (or null: automatic)")
    if name == "slurm":
        try:
            import submitit  # noqa: F401
        except ImportError:
            raise UserError("launcher=slurm needs submitit: pip install submitit") from None
        if str(lc.cluster) not in ("slurm", "local"):
            raise UserError(f"launcher.cluster={lc.cluster} must be slurm or local (submitit's local executor)")
        if int(lc.get("nodes") or 1) != 1 or int(lc.get("tasks_per_node") or 1) != 1:
            raise UserError(f"launcher.nodes={lc.get('nodes')}, tasks_per_node={lc.get('tasks_per_node')}: a cell's job "
                            "is one task on one node (several GPUs: launcher.gpus_per_node, ranks started by accelerate)")
        n = processes_per_cell(cfg)
        if n < 1:
            raise UserError(f"launcher.processes_per_cell={lc.get('processes_per_cell')} must be >= 1")
        if n > 1 and int(cfg.train.prompts_per_iter) % n:
            raise UserError(f"train.prompts_per_iter={cfg.train.prompts_per_iter} must be a multiple of the "
                            f"{n} data-parallel processes per cell")
        if not float(lc.timeout_min) > 0:
            raise UserError(f"launcher.timeout_min={lc.timeout_min} must be > 0")


def processes_per_cell(cfg: DictConfig) -> int:
    """Ranks that train one Slurm cell: launcher.processes_per_cell, by default one per GPU of the job."""
    lc = cfg.launcher
    if lc.get("processes_per_cell") is not None:
        return int(lc.processes_per_cell)
    return max(1, int(lc.get("gpus_per_node") or 0))


class DataParallelLauncher:
    """Under `accelerate launch` / torchrun: every rank runs every unit, in order, together (bench.runner.execute's cell
    lifecycle makes rank 0 the one writer); there is no lock polling, so the ranks never disagree on the order."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg

    def run(self, tasks: list[Task], grid_dir: Path) -> dict[str, str]:
        return {t.name: run_task(t, grid_dir) for t in tasks}


def build_launcher(cfg: DictConfig) -> Launcher:
    check_launcher(cfg)
    if distributed.active():
        return DataParallelLauncher(cfg)
    name = str(cfg.launcher.name) if cfg.get("launcher") else "local"
    return {"local": LocalLauncher, "parallel": ParallelLauncher, "slurm": SlurmLauncher}[name](cfg)


def settled_status(task: Task, grid_dir: Path) -> str:
    if task.kind == "base":
        return "done" if base_metrics_path(grid_dir).exists() else "pending"
    return str(store.read_status(task_dir(task, grid_dir))["status"])


def drive(launcher: Launcher, tasks: list[Task], grid_dir: Path, poll_s: float = 10.0, max_attempts: int = 3,
          echo: Callable[[str], None] = print) -> dict[str, str]:
    """Run every unit to a settled outcome (done, diverged or failed), sharing the grid with any other runner: units locked
    by a live runner are left to it and waited for; units whose runner died (stale lock) are taken over and
    resumed; a unit whose process dies `max_attempts` times counts as failed."""
    if isinstance(launcher, DataParallelLauncher):  # one pass, the same on every rank
        return launcher.run(tasks, grid_dir)
    # Finished and diverged units are results a rerun keeps: no launcher sees them (a worker pool started only to
    # read their status cost a rerun of the headline grid 7 s).
    outcome = {t.name: s for t in tasks if (s := settled_status(t, grid_dir)) in FINAL}
    for t in tasks:
        if t.kind == "cell" and outcome.get(t.name) == "done":  # lost rows of a finished cell: from its checkpoint
            store.repair_finished_metrics(task_dir(t, grid_dir))
    pending = [t for t in tasks if t.name not in outcome]
    attempts: Counter[str] = Counter()
    waiting: dict[str, Any] = {}  # units another runner held when we looked -> its owner (None: not known)
    announced: set[str] = set()
    while pending:
        runnable = []
        for t in pending:
            owner = make_lock(t.cell.cfg, task_dir(t, grid_dir)).holder()
            if owner is not None:
                waiting[t.name] = owner
                continue
            if t.name in waiting:  # its runner let go: it recorded an outcome, or it died and we resume the unit
                del waiting[t.name]
                status = settled_status(t, grid_dir)
                if status in SETTLED:
                    outcome[t.name] = status
                    continue
            runnable.append(t)
        if runnable:
            for name, result in launcher.run(runnable, grid_dir).items():
                if result in SETTLED:
                    outcome[name] = result
                elif result == "locked":  # another runner took it between our look and our attempt
                    waiting[name] = None
                else:
                    attempts[name] += 1
                    if attempts[name] >= max_attempts:
                        echo(f"giving up on {name}: its process died {attempts[name]} times; rerun the grid to resume it")
                        outcome[name] = "failed"
        pending = [t for t in pending if t.name not in outcome]
        held = {n: o for n, o in waiting.items() if o is not None and n not in outcome}
        if set(held) - announced:
            echo(f"waiting for {len(held)} unit(s) held by other runners: "
                 + "; ".join(f"{n} ({o.describe()})" for n, o in sorted(held.items())))
            announced |= set(held)
        if pending and not runnable:
            time.sleep(poll_s)
    return outcome
