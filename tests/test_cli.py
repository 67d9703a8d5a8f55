"""The CLI: one-line errors for bad names, skipped combinations with reasons."""
from __future__ import annotations

import subprocess
import sys

import pandas as pd

from bench import run


def _cli(*args, cwd):
    p = subprocess.run([sys.executable, "-m", "bench.run", *args], capture_output=True, text=True, cwd=cwd,
                       env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(__import__("pathlib").Path(__file__).parents[1])})
    return p.returncode, p.stdout, p.stderr


def test_unknown_grid_is_one_line_error(tmp_path):
    code, out, err = _cli("grid=no_such_grid", cwd=tmp_path)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "unknown grid 'no_such_grid'" in lines[0] and "elbo_vs_stepwise" in lines[0]
    assert "Traceback" not in err


def test_unknown_estimator_is_one_line_error(tmp_path):
    code, out, err = _cli("grid=smoke", "estimator=no_such", cwd=tmp_path)
    assert code == 2
    lines = err.strip().splitlines()
    assert lines == ["error: unknown estimator 'no_such'; valid: elbo, " + lines[0].split("elbo, ", 1)[1]]
    assert "stepwise" in lines[0]
    assert not (tmp_path / "results").exists()


def test_unknown_reward_world_sampler_objective(tmp_path, capsys):
    for override, kind in [("world.reward=no_such", "reward"), ("world=no_such", "world"),
                           ("sampler=no_such", "sampler"), ("objective=no_such", "objective")]:
        assert run.main(["grid=smoke", f"results_dir={tmp_path}", override]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"unknown {kind} 'no_such'; valid:" in err[0]


def test_all_invalid_grid_says_so(tmp_path, capsys):
    assert run.main(["grid=smoke", f"results_dir={tmp_path}", "estimator=stepwise", "sampler=ode"]) == 2
    assert "every cell of grid 'smoke' is invalid" in capsys.readouterr().err


def test_stepwise_on_ode_is_skipped_with_reason(tmp_path, capsys):
    assert run.main(["grid=smoke", f"results_dir={tmp_path}", "budget.iterations=1"]) == 0
    assert "skipping 1 cell(s): estimator 'stepwise' needs SDE edges but sampler 'ode' has none" in capsys.readouterr().out
    df = pd.read_parquet(tmp_path / "smoke" / "summary.parquet")
    skipped = df[df.status == "skipped"]
    assert list(skipped.method) == ["stepwise-ode"] and "needs SDE edges" in skipped.reason.iloc[0]
    assert not (tmp_path / "smoke" / "stepwise-ode-seed0").exists()
    assert "skipped `stepwise-ode`" in (tmp_path / "smoke" / "report.md").read_text()
    cols = {"grid", "cell", "seed", "sampler", "estimator", "objective", "status", "iteration", "nfe", "device_hours",
            "wall_s", "eval_reward", "eval_accuracy", "eval_heldout_accuracy", "eval_diversity"}
    assert cols <= set(df.columns)
