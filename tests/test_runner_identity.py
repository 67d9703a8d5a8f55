"""Cells are keyed by their config: a rerun reuses only cells of the same config, a restricted rerun keeps the
other cells in the report, command-line sweeps become axes, --cfg job runs nothing, divergence is a result, and
components from the user's own module (plugins) run under every launcher."""
from __future__ import annotations

import json
import shutil
import sys
import textwrap
from pathlib import Path

import pytest

from bench.runner.execute import read_identity
from bench.runner.grid import expand_grid
from bench.runner.resolve import cell_hash, identity
from bench.run import main
from runner_helpers import ONE_CELL, TWO_CELLS, digits_cache, finished_grid, results_dir, snapshot  # noqa: F401


def test_hash_ignores_where_and_how_a_cell_runs_but_not_what_it_computes() -> None:
    _, [a] = expand_grid("smoke", ONE_CELL[1:])
    _, [b] = expand_grid("smoke", [*ONE_CELL[1:], "launcher=parallel", "results_dir=/elsewhere", "world.threads=2",
                                   "checkpoint.every=3", "lock.heartbeat_s=5"])
    _, [c] = expand_grid("smoke", [*ONE_CELL[1:], "train.lr=1e-2"])
    assert a.hash == b.hash == cell_hash(a.cfg) and a.hash != c.hash
    assert "launcher" not in identity(a.cfg) and identity(a.cfg)["train"]["lr"] == 3e-4


def test_identity_kept_at_expansion_is_the_one_of_the_config() -> None:
    """A cell's identity is computed from its plain values when it is made; it must equal the identity of the
    DictConfig it runs with (what was stored before that shortcut), for every cell of the headline grid."""
    _, cells = expand_grid("elbo_vs_stepwise", [])
    assert len(cells) == 65  # 13 methods x 5 seeds, the invalid combinations included
    for cell in cells:
        assert cell.identity == identity(cell.cfg) and cell.hash == cell_hash(cell.cfg)
    values = {"train": {"lr": 1e-3}, "world": {"name": "digits", "threads": 1}, "launcher": {"name": "local"}}
    assert identity(values) == {"train": {"lr": 1e-3}, "world": {"name": "digits"}}
    assert values["world"] == {"name": "digits", "threads": 1} and "launcher" in values  # the caller's dict is kept


def test_defaults_are_filled_into_the_resolved_config() -> None:
    """config.yaml says everything a cell ran with, code defaults included."""
    _, [cell] = expand_grid("smoke", ONE_CELL[1:])
    assert cell.cfg.estimator.weight_floor == 0.05 and cell.cfg.sampler.train_fraction == 1.0
    assert cell.cfg.checkpoint.keep >= 1 and cell.cfg.train.ema_ramp is None


def test_rerun_reuses_only_same_config_and_says_so(capsys: pytest.CaptureFixture, finished_grid: Path,
                                                   tmp_path: Path) -> None:
    res = tmp_path / "results"
    shutil.copytree(finished_grid, res, symlinks=True)
    cell = res / "smoke" / "elbo-ode-seed0"
    stored = read_identity(cell)
    assert stored is not None and stored["identity"]["train"]["lr"] == 3e-4
    assert main([*ONE_CELL, f"results_dir={res}"]) == 0
    assert "0 to run, 0 to resume, 1 reused" in capsys.readouterr().out
    before = snapshot(res)
    assert main([*ONE_CELL, f"results_dir={res}", "train.lr=1e-2"]) == 2
    err = capsys.readouterr().err
    assert "was run with another config (train.lr: 0.0003 -> 0.01)" in err and len(err.strip().splitlines()) == 1
    assert snapshot(res) == before
    # A new seed of the same config is a new cell; the finished one is reused, not retrained.
    assert main([*ONE_CELL, f"results_dir={res}", "grid.seeds=[0,1]", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "elbo-ode-seed0: reuse" in out and "elbo-ode-seed1: run" in out
    assert snapshot(res) == before


def test_restricted_rerun_keeps_every_cell_in_the_report(capsys: pytest.CaptureFixture, digits_cache: Path,
                                                         tmp_path: Path) -> None:
    res = results_dir(tmp_path, digits_cache)
    assert main([*TWO_CELLS, f"results_dir={res}", "estimator=elbo"]) == 0
    assert main([*TWO_CELLS, f"results_dir={res}", "estimator=stepwise"]) == 0  # a sweep split over two runs
    names = {c["name"] for c in json.loads((res / "smoke" / "cells.json").read_text())}
    assert names == {"elbo-flow_sde-seed0", "stepwise-flow_sde-seed0"}
    import pandas as pd

    cells = set(pd.read_parquet(res / "smoke" / "summary.parquet")["cell"])
    assert {"elbo-flow_sde-seed0", "stepwise-flow_sde-seed0"} <= cells
    report = (res / "smoke" / "report.md").read_text()
    assert "elbo-flow_sde" in report and "stepwise-flow_sde" in report
    # Cells run with other common settings would be pooled with these: refused.
    before = snapshot(res)
    assert main([*TWO_CELLS, f"results_dir={res}", "estimator=elbo", "sampler=ode", "train.lr=1e-2"]) == 2
    assert "holds cells run with another config (train.lr: 0.0003 -> 0.01" in capsys.readouterr().err
    assert snapshot(res) == before


def test_command_line_sweep_becomes_an_axis(capsys: pytest.CaptureFixture) -> None:
    _, cells = expand_grid("smoke", ["estimator=elbo", "sampler=ode", "train.lr=1e-4,3e-4"])
    assert [c.name for c in cells] == ["elbo-ode-lr=1e_4-seed0", "elbo-ode-lr=3e_4-seed0"]
    assert [c.cfg.train.lr for c in cells] == [1e-4, 3e-4]
    _, cells = expand_grid("smoke", ["estimator=elbo,stepwise", "sampler=flow_sde"])
    assert [c.labels["estimator"] for c in cells] == ["elbo", "stepwise"]


def test_cfg_job_prints_resolved_configs_and_writes_nothing(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    assert main([*ONE_CELL, f"results_dir={tmp_path / 'r'}", "--cfg", "job"]) == 0
    out = capsys.readouterr().out
    assert "# elbo-ode-seed0: run" in out and "weight_floor: 0.05" in out and "1 to run" in out
    assert not (tmp_path / "r").exists()
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "elbo_vs_stepwise" in out and "estimator  elbo" in out and "--cfg job" in out
    assert main(["grid=elbo_vs_stepwise", "--help"]) == 0
    assert "axis estimator: stepwise, elbo" in capsys.readouterr().out


def test_divergence_is_a_result(capsys: pytest.CaptureFixture, digits_cache: Path, tmp_path: Path) -> None:
    """train.lr=1: the samples go non-finite; the cell is marked diverged (before the judge sees a NaN), exit 0, and
    a rerun keeps it as a result."""
    res = results_dir(tmp_path, digits_cache)
    argv = ["grid=smoke", "estimator=elbo", "sampler=ode", "train.lr=1", "budget.iterations=30", "eval.every=10",
            f"results_dir={res}"]
    assert main(argv) == 0
    status = json.loads((res / "smoke" / "elbo-ode-seed0" / "status.json").read_text())
    assert status["status"] == "diverged" and status["quantity"] in ("samples", "loss", "gradients", "rewards")
    assert status["iteration"] >= 1 and f"at iteration {status['iteration']}" in status["error"]
    assert "1 diverged, 0 failed" in capsys.readouterr().out
    assert main(argv) == 0
    assert "1 reused" in capsys.readouterr().out


PLUGIN = textwrap.dedent('''
    """A user's sampler outside the package: Euler ODE with half-size steps at the end (a test plugin)."""
    from bench.core.schema import Option
    from samplers.ode import ODESampler


    class HalfODE(ODESampler):
        """An ODE sampler under another name, with one option of its own."""

        OPTIONS = {"flavour": Option("plain", str, choices=("plain", "salted"))}
''')


@pytest.mark.parametrize("launcher", ["local", pytest.param("parallel", marks=pytest.mark.slow),
                                      pytest.param("slurm", marks=pytest.mark.slow)])
def test_plugin_from_a_module_outside_the_package(launcher: str, capsys: pytest.CaptureFixture, digits_cache: Path,
                                                  tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_lab").mkdir()
    (tmp_path / "my_lab" / "__init__.py").write_text("")
    (tmp_path / "my_lab" / "samplers.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}:{':'.join(sys.path)}")  # the launchers' worker processes
    res = results_dir(tmp_path, digits_cache)
    extra = {"local": [], "parallel": ["launcher.workers=1"], "slurm": ["launcher.cluster=local", "launcher.gpus_per_node=0"]}
    argv = ["grid=smoke", "estimator=elbo", "sampler=my_lab.samplers:HalfODE", "+sampler.flavour=salted",
            "budget.iterations=2", "eval.every=1", f"results_dir={res}", f"launcher={launcher}", *extra[launcher]]
    assert main(argv) == 0, capsys.readouterr()
    [cell] = [d for d in (res / "smoke").iterdir() if d.is_dir() and d.name.startswith("elbo-")]
    assert json.loads((cell / "status.json").read_text())["status"] == "done"
    assert "flavour: salted" in (cell / "config.yaml").read_text()
    assert main([*argv[:3], "+sampler.flavour=sweet", *argv[4:]]) == 2
    assert "sampler.flavour=sweet: unknown value; valid: plain, salted" in capsys.readouterr().err
