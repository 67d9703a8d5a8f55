"""Crash safety: a cell killed with SIGKILL at any point resumes from its last checkpoint, and its metrics.jsonl
ends equal, row for row, to an uninterrupted run with the same seed (timing columns excluded: they are
measurements, see tests/runner_helpers.py); torn metrics lines are ignored; stale locks are detected.
"""
from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import pytest

from bench.runner import store
from bench.runner.locks import CellLock, LockOwner, read_owner, stale_reason
from runner_helpers import (ONE_CELL, TWO_CELLS, attempts, comparable, digits_cache, metrics, popen,  # noqa: F401
                            process_tree, results_dir, run_runner, start_runner, status, survivors)

# The headline grid at a reduced budget, without its tuning sweep and its past-the-budget extension: the grpo_clip
# cells of seed 0 (3 valid estimator x sampler pairs and the equal-NFE control), a few iterations each, evals and
# checkpoints at different iterations so kills land between checkpoints.
HEADLINE = ["grid=elbo_vs_stepwise", "grid.seeds=[0]", "grid.tune=null", "objective=grpo_clip", "budget.until=null",
            "budget.nfe=null", "budget.iterations=4",
            "eval.every_nfe=null", "eval.every=2", "checkpoint.every=3", "world.eval.samples_per_class=10",
            "launcher.poll_s=0.2"]
PARALLEL = ["launcher=parallel", "launcher.workers=2", "launcher.threads_per_worker=1"]


@pytest.mark.slow  # CI runs it (python -m pytest -m slow); the default suite stays under 5 min
def test_sigkill_anywhere_resumes_to_identical_metrics(tmp_path: Path, digits_cache: Path) -> None:
    # 6 iterations; evals at 2, 4, 6 and checkpoints at 2, 3, 4, 6, so some kills land between checkpoints.
    args = [*ONE_CELL, "budget.iterations=6", "eval.every=2", "checkpoint.every=3"]
    ref_dir = results_dir(tmp_path / "ref", digits_cache)
    assert run_runner([*args, f"results_dir={ref_dir}"]) == 0
    reference = metrics(ref_dir / "smoke" / "elbo-ode-seed0")
    assert [r["iteration"] for r in reference] == list(range(7))

    res = results_dir(tmp_path / "killed", digits_cache)
    cell = res / "smoke" / "elbo-ode-seed0"
    victim_args = [*args, f"results_dir={res}"]
    # Each kill resumes from the checkpoint the previous one left: none, 3, 4, 4, 4.
    kills = [("mid_metrics_write", 5),    # torn row of iteration 4; last checkpoint: 3
             ("after_metrics_write", 2),  # row of iteration 5 on disk, no checkpoint at 5
             ("mid_checkpoint", 1),       # half-written temp checkpoint at iteration 6
             ("mid_truncate", 1)]         # killed while truncating metrics on resume
    for point, nth in kills:
        assert run_runner(victim_args, fault=(point, nth)) == -signal.SIGKILL, point
        rows = metrics(cell)
        assert [r["iteration"] for r in rows] == list(range(len(rows))), f"{point}: rows out of order or duplicated"
        assert status(cell) == "running"
        assert json.loads((cell / store.LOCK_FILE).read_text())["pid"] > 0  # the dead runner's lock is left behind
    # A kill at a random moment: any phase of an iteration, an eval, a checkpoint, or the report at the end.
    proc = start_runner(victim_args)
    time.sleep(random.Random().uniform(0.2, 2.0))
    proc.kill()
    proc.join()
    assert run_runner(victim_args) == 0

    resumed = metrics(cell)
    assert [r["iteration"] for r in resumed] == [r["iteration"] for r in reference]
    assert comparable(resumed) == comparable(reference)
    assert (cell / "metrics.jsonl").read_text().endswith("\n")
    assert status(cell) == "done" and not (cell / store.LOCK_FILE).exists()
    assert not list(cell.rglob(".*.tmp")), "temp files of killed writers are cleaned up"
    runs = attempts(cell)
    assert len(runs) >= 5 and all(r["resume"] for r in runs[1:5])
    assert all("not running" in r["took_over"] or "zombie" in r["took_over"] for r in runs[1:] if r["took_over"])


@pytest.mark.slow  # CI runs it (python -m pytest -m slow); the default suite stays under 5 min
def test_random_sigkills_resume_to_identical_metrics(tmp_path: Path, digits_cache: Path) -> None:
    """Kills at random moments, several in a row, on the two-estimator grid (stepwise and elbo)."""
    args = [*TWO_CELLS, "budget.iterations=4", "eval.every=2", "checkpoint.every=3"]
    ref_dir = results_dir(tmp_path / "ref", digits_cache)
    assert run_runner([*args, f"results_dir={ref_dir}"]) == 0
    res = results_dir(tmp_path / "killed", digits_cache)
    rng = random.Random()
    for _ in range(2):
        proc = start_runner([*args, f"results_dir={res}"])
        time.sleep(rng.uniform(0.3, 3.0))
        proc.kill()
        proc.join()
    assert run_runner([*args, f"results_dir={res}"]) == 0
    for cell in ("stepwise-flow_sde-seed0", "elbo-flow_sde-seed0"):
        assert comparable(metrics(res / "smoke" / cell)) == comparable(metrics(ref_dir / "smoke" / cell)), cell


def test_torn_last_line_is_ignored(tmp_path: Path) -> None:
    store.append_metrics(tmp_path, {"iteration": 0, "x": 1.0})
    store.append_metrics(tmp_path, {"iteration": 1, "x": float("nan")})
    with open(tmp_path / store.METRICS_FILE, "a") as f:
        f.write('{"iteration": 2}')  # complete JSON, but no newline yet: still in flight
    assert [r["iteration"] for r in store.read_metrics(tmp_path)] == [0, 1]
    assert store.read_metrics(tmp_path)[1]["x"] == "nan"
    with open(tmp_path / store.METRICS_FILE, "a") as f:
        f.write('\n{"iteration": 3, "x"')
    assert [r["iteration"] for r in store.read_metrics(tmp_path)] == [0, 1, 2]
    store.truncate_metrics(tmp_path, 1)
    assert (tmp_path / store.METRICS_FILE).read_text().count("\n") == 2


def test_atomic_write_leaves_old_file_on_error(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    store.atomic_write_text(path, "old")
    with pytest.raises(RuntimeError):
        with store.atomic_path(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_stale_lock_of_dead_process_is_detected_and_broken(tmp_path: Path) -> None:
    proc = popen(["-c", "import time; time.sleep(60)"])
    try:
        owner = LockOwner.me()
        owner.pid, owner.proc_start = proc.pid, None
        path = tmp_path / store.LOCK_FILE
        path.write_text(json.dumps(owner.__dict__))
        lock = CellLock(path)
        assert stale_reason(path, read_owner(path)[0], 600) is None
        assert not lock.acquire(), "a live owner keeps its lock"
        proc.kill()
        proc.wait()
        assert "not running" in stale_reason(path, read_owner(path)[0], 600)
        assert lock.acquire() and "not running" in lock.broke
        assert read_owner(path)[0].pid == os.getpid()
        assert not CellLock(path).acquire(), "this process holds it now"
        lock.release()
        assert not path.exists()
    finally:
        proc.kill()
        proc.wait()


def test_zombie_owner_and_foreign_host_staleness(tmp_path: Path) -> None:
    path = tmp_path / store.LOCK_FILE
    proc = popen(["-c", "pass"])
    while proc.poll() is None:  # poll() reaps it: wait for the exit without reaping
        time.sleep(0.05)
    owner = LockOwner.me()
    owner.pid, owner.proc_start = proc.pid, None
    path.write_text(json.dumps(owner.__dict__))
    assert stale_reason(path, read_owner(path)[0], 600) is not None
    owner.host = "some-other-node"  # its pid cannot be checked from here: only the heartbeat age counts
    path.write_text(json.dumps(owner.__dict__))
    assert stale_reason(path, read_owner(path)[0], 600) is None
    old = time.time() - 3600
    os.utime(path, (old, old))
    assert "no heartbeat" in stale_reason(path, read_owner(path)[0], 600)


def test_requeued_slurm_job_takes_its_lock_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / store.LOCK_FILE
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    owner = LockOwner.me()
    owner.host, owner.pid = "node-a", 1  # the first incarnation ran on another node
    path.write_text(json.dumps(owner.__dict__))
    assert stale_reason(path, read_owner(path)[0], 600) is None
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert "requeued" in stale_reason(path, read_owner(path)[0], 600)


def kill_and_rerun(tmp_path: Path, digits_cache: Path, kills: int, rng: random.Random,
                   restrict: tuple[str, ...] = ()) -> dict[str, int]:
    """SIGKILL the runner of HEADLINE at `kills` random moments, the local and the parallel launcher in turn, each
    kill hitting the rerun after the previous one; then one run to the end. After every kill: no process the runner
    started is left, and each cell's rows are a prefix of the uninterrupted run's; at the end they are all of it."""
    ref = results_dir(tmp_path / "ref", digits_cache)
    start = time.monotonic()
    headline = [*HEADLINE, *restrict]
    assert run_runner([*headline, f"results_dir={ref}"], timeout=600) == 0
    full_s = time.monotonic() - start
    name = HEADLINE[0].split("=")[1]
    cells = sorted(d.name for d in (ref / name).iterdir() if d.name.endswith("-seed0"))
    reference = {c: comparable(metrics(ref / name / c)) for c in cells}
    assert cells and all(len(r) == 5 for r in reference.values())

    res = results_dir(tmp_path / "killed", digits_cache)
    grid = res / name
    seen_procs = orphans = mid_run = 0
    # Each rerun goes on from the last checkpoints: short windows spread the kills over the whole grid's work.
    window = full_s * min(0.6, 3.0 / kills)
    for k in range(kills):
        parallel = k % 2 == 1
        proc = start_runner([*headline, *(PARALLEL if parallel else []), f"results_dir={res}"])
        tree: set[tuple[int, int]] = set()
        if parallel:  # its random moment falls while workers run (once they started, if any cell is left)
            cap = time.monotonic() + full_s
            while proc.is_alive() and time.monotonic() < cap and len(tree) < 2:
                tree |= process_tree(proc.pid)
                time.sleep(0.02)
        deadline = time.monotonic() + rng.uniform(0.2, window)
        while time.monotonic() < deadline and proc.is_alive():
            tree |= process_tree(proc.pid)  # workers, and anything they start, as they appear
            time.sleep(0.02)
        proc.kill()
        proc.join()
        seen_procs += len(tree)
        left = survivors(tree, wait_s=20)  # a worker still starting up (contended CPUs) dies at `import bench`
        orphans += len(left)
        assert not left, f"kill {k + 1}: {len(left)} process(es) of the killed runner still run: {left}"
        for c in cells:
            rows = comparable(metrics(grid / c))
            assert rows == reference[c][: len(rows)], f"kill {k + 1}: {c} rows differ from the uninterrupted run"
        mid_run += any(store.read_status(grid / c)["status"] != "done" for c in cells)
    assert run_runner([*headline, f"results_dir={res}"], timeout=600) == 0
    compared = 0
    for c in cells:
        assert comparable(metrics(grid / c)) == reference[c], c
        assert status(grid / c) == "done" and not (grid / c / store.LOCK_FILE).exists()
        compared += len(reference[c])
    return {"kills": kills, "kills_before_the_grid_was_done": mid_run, "rows_compared": compared,
            "processes_seen": seen_procs, "orphans": orphans}


@pytest.mark.slow  # CI runs it (python -m pytest -m slow); the default suite stays under 5 min
def test_three_kills_of_the_headline_grid(tmp_path: Path, digits_cache: Path) -> None:
    seed = random.randrange(2**32)
    print(f"random kill moments from seed {seed}")
    # One objective: its 3 cells (both estimators, both samplers) keep the default suite short.
    print(kill_and_rerun(tmp_path, digits_cache, 3, random.Random(seed), restrict=("objective=grpo_clip",)))


@pytest.mark.slow
def test_twenty_kills_of_the_headline_grid(tmp_path: Path, digits_cache: Path) -> None:
    seed = random.randrange(2**32)
    print(f"random kill moments from seed {seed}")
    print(kill_and_rerun(tmp_path, digits_cache, 20, random.Random(seed)))


@pytest.mark.slow  # CI runs it (python -m pytest -m slow); the default suite stays under 5 min
def test_killed_parallel_runner_takes_its_workers_along(tmp_path: Path, digits_cache: Path) -> None:
    """The issue's case: kill -9 of a launcher=parallel runner left its workers running, taking queued cells."""
    res = results_dir(tmp_path, digits_cache)
    grid = res / "smoke"
    # Three cells on two workers, long enough never to finish here: one cell waits in the queue.
    proc = start_runner(["grid=smoke", "budget.iterations=500", "eval.every=100", *PARALLEL, f"results_dir={res}"])
    deadline = time.monotonic() + 240
    tree: set[tuple[int, int]] = set()
    while True:
        tree |= process_tree(proc.pid)
        locks = list(grid.glob("*-seed0/" + store.LOCK_FILE))
        owners = {o.pid for o in (read_owner(p)[0] for p in locks) if o is not None} - {proc.pid}
        if len(owners) == 2 and all(len(metrics(p.parent)) >= 2 for p in locks):
            break  # both workers are training
        assert proc.is_alive() and time.monotonic() < deadline, "the workers never started training"
        time.sleep(0.05)
    tree |= process_tree(proc.pid)
    workers = {p for p in tree if p[0] in owners}
    assert len(workers) == 2
    proc.kill()
    proc.join()
    assert survivors(tree, wait_s=5) == set(), "processes of the killed runner still run"
    rows = {c.name: len(metrics(c)) for c in grid.glob("*-seed0")}
    time.sleep(1.0)
    assert {c.name: len(metrics(c)) for c in grid.glob("*-seed0")} == rows, "a cell went on after its runner died"
    assert sum((c / store.RUNS_FILE).exists() for c in grid.glob("*-seed0")) == 2, "nobody took the queued cell"
