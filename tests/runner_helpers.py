"""Shared helpers for the runner tests (launchers, crash safety, reports, bad input): tiny grids in tmp folders
that share one digits cache, and the CLI run in a subprocess where a test needs a real process (kills, exit codes).

Timing columns (bench.training.train.TIMING_KEYS: wall/device seconds, device-hours, peak memory) are measurements and
differ between any two runs; "equal row for row" below means the same iterations and every other column equal.
"""
from __future__ import annotations

import builtins
import errno
import importlib
import io
import json
import multiprocessing
import os
import pkgutil
import signal
import stat
import subprocess
import sys
import time
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import pytest
import torch
from threadpoolctl import threadpool_limits

from bench.runner import store
from bench.runner.locks import proc_stat
from bench.training.train import TIMING_KEYS

REPO = Path(__file__).resolve().parents[1]

# One cell (the smoke grid restricted to elbo x ode), 3 iterations: a few seconds on a CPU.
ONE_CELL = ["grid=smoke", "estimator=elbo", "sampler=ode", "budget.iterations=3", "eval.every=1"]
# Two cells: both estimators on the flow-SDE sampler.
TWO_CELLS = ["grid=smoke", "sampler=flow_sde", "budget.iterations=3", "eval.every=1"]


@pytest.fixture(scope="session")
def digits_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits world's pretrained model and judges, built once per session and shared by every results folder."""
    from bench.runner.components import build_world
    from bench.runner.config import compose_config

    root = tmp_path_factory.mktemp("shared-results")
    world = build_world(compose_config(["grid=smoke", f"results_dir={root}"]))
    world.build_policy()
    world.judges  # noqa: B018 (fits and caches them)
    return root / "cache"


@pytest.fixture(scope="session")
def finished_grid(tmp_path_factory: pytest.TempPathFactory, digits_cache: Path) -> Path:
    """A results folder holding the finished ONE_CELL grid (read-only for the tests: copy it to change it)."""
    res = results_dir(tmp_path_factory.mktemp("finished"), digits_cache)
    assert run_runner([*ONE_CELL, f"results_dir={res}"]) == 0
    return res


def results_dir(tmp: Path, cache: Path) -> Path:
    """A fresh results folder whose cache/ is the shared one."""
    d = tmp / "results"
    d.mkdir(parents=True, exist_ok=True)
    (d / "cache").symlink_to(cache, target_is_directory=True)
    return d


def cli(args: list[str], timeout: float = 120, **kw: Any) -> subprocess.CompletedProcess:
    """`python -m bench.run ARGS` in a subprocess (one thread for torch, so two at once fit the test machine)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **kw.pop("env", {})}
    return subprocess.run([sys.executable, "-m", "bench.run", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env, **kw)


def popen(args: list[str], **kw: Any) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **kw.pop("env", {})}
    return subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, **kw)


def comparable(rows: list[dict]) -> list[dict]:
    """Rows without their timing columns (see the module docstring)."""
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def metrics(cell_dir: Path) -> list[dict]:
    return store.read_metrics(cell_dir)


def attempts(cell_dir: Path) -> list[dict]:
    return store.read_jsonl(cell_dir / store.RUNS_FILE)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (not following the cache symlink) -> its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and "cache" not in p.relative_to(folder).parts}


def status(cell_dir: Path) -> str:
    return json.loads((cell_dir / store.STATUS_FILE).read_text())["status"]


def process_tree(pid: int) -> set[tuple[int, int]]:
    """(pid, start time) of every live descendant of `pid`, from /proc (Linux): the start time tells a process
    from a later one that reuses its pid."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                text = (d / "stat").read_text()
            except OSError:
                continue
            children.setdefault(int(text[text.rindex(")") + 2:].split()[1]), []).append(int(d.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            stat = proc_stat(child)
            if stat is not None and stat[0] not in "ZX" and (child, stat[1]) not in found:
                found.add((child, stat[1]))
                todo.append(child)
    return found


def alive(proc: tuple[int, int]) -> bool:
    """Whether the process (pid, start time) of process_tree still runs (a zombie does not)."""
    stat = proc_stat(proc[0])
    return stat is not None and stat[0] not in "ZX" and stat[1] == proc[1]


def survivors(procs: set[tuple[int, int]], wait_s: float = 10.0) -> set[tuple[int, int]]:
    """Those of `procs` still running after up to `wait_s` seconds (a worker whose runner died must be gone)."""
    deadline = time.monotonic() + wait_s
    while True:
        left = {p for p in procs if alive(p)}
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


# Runners started as children of a fork server that has already imported the bench: each one starts in a fraction
# of a second instead of paying Python's imports again (torch, torch._dynamo for the optimizer, matplotlib), and
# each is a real process that can be SIGKILLed.
_PRELOAD = ["runner_helpers", "bench.run", "bench.reporting.plots", "bench.reporting.report_html", "torch.optim", "torch._dynamo",
            "sklearn.neural_network", "sklearn.svm"]
# The registries import every module of these packages on first use; the children should not each do it.
_REGISTRY_PACKAGES = ["samplers", "estimators", "objectives", "bench.worlds", "bench.rewards"]
_ctx: Any = None


def _context() -> Any:
    global _ctx
    if _ctx is None:
        modules = [f"{pkg}.{m.name}" for pkg in _REGISTRY_PACKAGES
                   for m in pkgutil.iter_modules(importlib.import_module(pkg).__path__) if not m.name.startswith("_")]
        _ctx = multiprocessing.get_context("forkserver")
        _ctx.set_forkserver_preload(_PRELOAD + modules)
    return _ctx


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install_fault(point: str, nth: int) -> None:
    """Make this process SIGKILL itself at the nth occurrence (1-based) of `point`:

    mid_metrics_write: half of a metrics row written, no newline (a kill inside write(2));
    after_metrics_write: a row on disk, its iteration's checkpoint not yet;
    mid_checkpoint: half of the temp checkpoint written;
    mid_truncate: on resume, the truncated metrics file written but not yet renamed into place;
    disk_full: from the nth metrics row on, every write fails with ENOSPC, as on a full disk (os.write, and
    files opened for writing: metrics, status, checkpoints, samples).
    """
    seen = [0]

    def hit() -> bool:
        seen[0] += 1
        return seen[0] == nth

    append_jsonl, save, replace = store.append_jsonl, store.save_state, os.replace

    def torn_append(path: Path, row: dict) -> None:
        if Path(path).name == store.METRICS_FILE and hit():
            line = (json.dumps(row) + "\n").encode()
            with open(path, "ab") as f:
                f.write(line[: len(line) // 2])
            _die()
        append_jsonl(path, row)

    def append_then_die(path: Path, row: dict) -> None:
        append_jsonl(path, row)
        if Path(path).name == store.METRICS_FILE and hit():
            _die()

    def torn_save(obj: Any, path: Path) -> None:
        save(obj, path)
        if hit():
            data = Path(path).read_bytes()
            Path(path).write_bytes(data[: len(data) // 2])
            _die()

    def replace_or_die(src: Any, dst: Any) -> None:
        if str(dst).endswith(store.METRICS_FILE) and hit():
            _die()
        replace(src, dst)

    def fill_disk() -> None:
        def full(name: Any = None) -> OSError:
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), *([str(name)] if name is not None else []))

        real_open, real_write = builtins.open, os.write

        def write(fd: int, data: Any) -> int:
            if stat.S_ISREG(os.fstat(fd).st_mode):  # files fill the disk; pipes (multiprocessing's) do not
                raise full()
            return real_write(fd, data)

        def open_(file: Any, mode: str = "r", *a: Any, **k: Any) -> Any:
            if any(c in mode for c in "wax+"):
                raise full(file)
            return real_open(file, mode, *a, **k)

        os.write, builtins.open, io.open = write, open_, open_

    def full_from_nth(path: Path, row: dict) -> None:
        if Path(path).name == store.METRICS_FILE and hit():
            fill_disk()
        append_jsonl(path, row)

    if point == "mid_metrics_write":
        store.append_jsonl = torn_append
    elif point == "after_metrics_write":
        store.append_jsonl = append_then_die
    elif point == "mid_checkpoint":
        store.save_state = torn_save
    elif point == "mid_truncate":
        os.replace = replace_or_die
    elif point == "disk_full":
        store.append_jsonl = full_from_nth
    else:
        raise ValueError(f"unknown fault point {point!r}")


def _runner_child(argv: list[str], fault: tuple[str, int] | None, threads: int, log: str | None) -> None:
    from bench.run import main

    if log is not None:  # stdout and stderr of this runner (and of the processes it starts) into one file
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)

    # One thread everywhere: two children fit a 2-core machine, and every run (reference or resumed) uses the
    # same thread count, so float reductions happen in the same order.
    torch.set_num_threads(threads)
    threadpool_limits(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # and for the processes it starts (workers, local Slurm jobs)
    if fault is not None:
        install_fault(*fault)
    sys.exit(main(argv))


def start_runner(argv: list[str], fault: tuple[str, int] | None = None, threads: int = 1,
                 log: Path | None = None) -> BaseProcess:
    """`python -m bench.run ARGV` as a child process (see _PRELOAD), optionally with a fault that kills it (or
    fills the disk) and its output sent to `log`."""
    proc = _context().Process(target=_runner_child, args=(list(argv), fault, threads, str(log) if log else None))
    proc.start()
    return proc


def run_runner(argv: list[str], fault: tuple[str, int] | None = None, timeout: float = 180,
               log: Path | None = None) -> int:
    """Run it to the end; its exit code (-9: it SIGKILLed itself)."""
    proc = start_runner(argv, fault, log=log)
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join()
        raise TimeoutError(f"bench.run {' '.join(argv)} did not finish in {timeout} s")
    return proc.exitcode
