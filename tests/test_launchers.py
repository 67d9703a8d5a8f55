"""Launchers: two runners on one grid run every cell exactly once; launcher=parallel and launcher=slurm (submitit's
local executor, no cluster) give the same metrics as launcher=local (timing columns excluded, see
tests/runner_helpers.py)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pandas as pd
import pytest

from bench.runner import store
from bench.core.errors import UserError
from bench.runner.launchers import ParallelLauncher, available_cores, check_launcher
from bench.runner.config import compose_config
from bench.runner.resolve import resolve_cell
from runner_helpers import (TWO_CELLS, attempts, comparable, digits_cache, metrics, results_dir,  # noqa: F401
                            run_runner, start_runner, status)

CELLS = ("stepwise-flow_sde-seed0", "elbo-flow_sde-seed0")
# Evals of 500 samples at every iteration: a cell runs long enough (seconds) to be preempted in the middle.
GRID = [*TWO_CELLS, "budget.iterations=6", "world.eval.samples_per_class=50", "checkpoint.every=2"]


@pytest.fixture(scope="module")
def local_run(tmp_path_factory: pytest.TempPathFactory, digits_cache: Path) -> Path:
    """The two-cell grid run with launcher=local: the reference."""
    res = results_dir(tmp_path_factory.mktemp("local"), digits_cache)
    assert run_runner([*GRID, f"results_dir={res}"]) == 0
    return res / "smoke"


def assert_same_results(grid: Path, reference: Path) -> None:
    for cell in CELLS:
        assert status(grid / cell) == "done"
        assert comparable(metrics(grid / cell)) == comparable(metrics(reference / cell)), cell
    keys = ["cell", "iteration", "nfe", "eval_reward", "eval_accuracy", "eval_heldout_accuracy"]
    a = pd.read_parquet(grid / "summary.parquet")[keys].sort_values(["cell", "iteration"]).reset_index(drop=True)
    b = pd.read_parquet(reference / "summary.parquet")[keys].sort_values(["cell", "iteration"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)


@pytest.mark.slow  # CI runs it (python -m pytest -m slow); the default suite stays under 5 min
def test_two_runners_on_one_grid_run_each_cell_once(tmp_path: Path, digits_cache: Path) -> None:
    # The full smoke grid: three valid cells (and one skipped); both runners start at the same moment.
    res = results_dir(tmp_path, digits_cache)
    args = ["grid=smoke", "budget.iterations=3", "eval.every=1", "launcher.poll_s=0.2", f"results_dir={res}"]
    runners = [start_runner(args), start_runner(args)]
    for r in runners:
        r.join(180)
    assert [r.exitcode for r in runners] == [0, 0]
    grid = res / "smoke"
    cells = [d for d in grid.iterdir() if d.is_dir() and d.name.endswith("-seed0")]
    assert sorted(c.name for c in cells) == sorted([*CELLS, "elbo-ode-seed0"])
    pids = {r.pid for r in runners}
    for cell in cells:
        runs = attempts(cell)
        assert len(runs) == 1, f"{cell.name} ran {len(runs)} times: {runs}"
        assert runs[0]["pid"] in pids and not runs[0]["resume"]
        assert [r["iteration"] for r in metrics(cell)] == [0, 1, 2, 3]
        assert status(cell) == "done" and not (cell / store.LOCK_FILE).exists()
    assert not (grid / "base" / store.LOCK_FILE).exists()
    df = pd.read_parquet(grid / "summary.parquet")
    assert set(df[df.status == "done"].cell) == {"base", *(c.name for c in cells)}


@pytest.mark.slow  # CI runs it (python -m pytest -m slow); the default suite stays under 5 min
def test_parallel_launcher_matches_local(tmp_path: Path, digits_cache: Path, local_run: Path) -> None:
    res = results_dir(tmp_path, digits_cache)
    assert run_runner([*GRID, "launcher=parallel", "launcher.workers=2", f"results_dir={res}"]) == 0
    assert_same_results(res / "smoke", local_run)
    assert len({attempts(res / "smoke" / c)[0]["pid"] for c in CELLS}) == 2, "each cell ran in its own worker"


@pytest.mark.slow  # CI runs it (python -m pytest -m slow); the default suite stays under 5 min
def test_slurm_launcher_with_submitit_local_executor(tmp_path: Path, digits_cache: Path, local_run: Path) -> None:
    """Two cells, each a job of submitit's local executor; one is preempted (SIGUSR2, as Slurm signals a job
    before its time limit) in the middle of training, requeued, and resumes from its checkpoint."""
    res = results_dir(tmp_path, digits_cache)
    # The base model's eval is the same as the reference's: reuse it, so the array holds just the two cells.
    shutil.copytree(local_run / "base", res / "smoke" / "base")
    args = [*GRID, "launcher=slurm", "launcher.cluster=local", "launcher.gpus_per_node=0", "launcher.timeout_min=10",
            f"results_dir={res}"]
    runner = start_runner(args)
    grid, victim = res / "smoke", res / "smoke" / CELLS[1]
    deadline = time.monotonic() + 240
    while len(metrics(victim)) < 3:  # training, and iteration 1 checkpointed (its row precedes iteration 2's)
        assert runner.is_alive() and time.monotonic() < deadline, "the job never started training"
        time.sleep(0.01)
    os.kill(json.loads((victim / store.LOCK_FILE).read_text())["pid"], signal.SIGUSR2)
    runner.join(240)
    assert runner.exitcode == 0
    assert_same_results(grid, local_run)
    runs = attempts(victim)
    assert len(runs) == 2 and not runs[0]["resume"] and runs[1]["resume"], runs
    assert len(attempts(grid / CELLS[0])) == 1
    assert "Requeued job" in "".join(p.read_text() for p in (grid / ".submitit").glob("*/*_log.out"))
    assert len(list((grid / ".submitit").glob("*/*_result.pkl"))) == 2  # one job per cell


def test_parallel_threads_do_not_oversubscribe() -> None:
    cfg = resolve_cell(compose_config(["grid=smoke", "launcher=parallel", "launcher.workers=2"]))
    launcher = ParallelLauncher(cfg)
    assert launcher.workers == 2 and launcher.workers * launcher.threads <= max(available_cores(), 2)


@pytest.mark.parametrize("override,message", [
    (["launcher=slurm", "launcher.nodes=2"], r"launcher.nodes=2: out of range; valid: 1 <= integer <= 1"),
    (["launcher=slurm", "launcher.gpus_per_node=3"], "multiple of the 3 data-parallel processes"),
    (["launcher=slurm", "launcher.cluster=pbs"], "launcher.cluster=pbs: unknown value; valid: slurm, local"),
    (["launcher=parallel", "launcher.workers=0"], r"launcher.workers=0: out of range; valid: 1 <= integer"),
])
def test_launcher_config_errors(override: list[str], message: str) -> None:
    with pytest.raises(UserError, match=message):
        check_launcher(resolve_cell(compose_config(["grid=smoke", *override])))


def test_finished_and_diverged_cells_reach_no_launcher_and_failed_ones_are_retried(tmp_path: Path) -> None:
    """A rerun keeps finished and diverged cells as results (execute.FINAL): none is handed to the launcher (the
    parallel one would start its worker pool only to read their status); a failed cell is run again."""
    from omegaconf import OmegaConf

    from bench.runner.execute import Task
    from bench.runner.grid import Cell
    from bench.runner.launchers import drive

    cfg = OmegaConf.create({"lock": {"heartbeat_s": 30}})
    tasks = []
    for name, state in [("a-seed0", "done"), ("b-seed0", "diverged"), ("c-seed0", "failed"), ("d-seed0", None)]:
        if state is not None:
            (tmp_path / name).mkdir()
            store.write_status(tmp_path / name, state)
        tasks.append(Task("cell", Cell(name, name[:1], 0, {}, [], cfg)))

    class Recording:
        def __init__(self) -> None:
            self.seen: list[str] = []

        def run(self, batch: list[Task], grid_dir: Path) -> dict[str, str]:
            self.seen += [t.name for t in batch]
            return {t.name: "done" for t in batch}

    launcher = Recording()
    outcome = drive(launcher, tasks, tmp_path, poll_s=0.01, echo=lambda line: None)
    assert launcher.seen == ["c-seed0", "d-seed0"]
    assert outcome == {"a-seed0": "done", "b-seed0": "diverged", "c-seed0": "done", "d-seed0": "done"}
