"""The training loop: ratio 1 before the first update, determinism, and NaN handling per cell."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from bench import run
from bench.runner.store import read_metrics, read_status
from bench.training.train import TIMING_KEYS


def _run(tmp_path, *overrides):
    return run.main(["grid=smoke", f"results_dir={tmp_path}", *overrides])


def _deterministic(rows):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


@pytest.mark.parametrize("estimator,sampler", [("stepwise", "flow_sde"), ("elbo", "ode")])
def test_ratio_is_exactly_one_before_the_first_update(tmp_path, estimator, sampler):
    assert _run(tmp_path, f"estimator={estimator}", f"sampler={sampler}", "budget.iterations=1",
                "train.minibatches=1") == 0
    row = read_metrics(tmp_path / "smoke" / f"{estimator}-{sampler}-seed0")[1]
    assert row["ratio_min"] == 1.0 and row["ratio_max"] == 1.0 and row["ratio_mean"] == 1.0


def test_same_seed_gives_identical_metrics(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        assert _run(d, "estimator=elbo", "sampler=flow_sde", "budget.iterations=3") == 0
    ra, rb = (read_metrics(d / "smoke" / "elbo-flow_sde-seed0") for d in (a, b))
    # Timing columns are measurements of this machine; every other figure must match exactly.
    assert len(ra) == 4 and _deterministic(ra) == _deterministic(rb)
    assert all("eval_reward" in r for r in (ra[0], ra[2], ra[3]))


def test_divergence_stops_only_that_cell(tmp_path):
    """lr 1 drives the policy non-finite: that cell is `diverged` (a result, exit 0), its twin at lr 1e-4 finishes
    untouched, and the report lists the diverged one."""
    code = _run(tmp_path, "estimator=elbo", "sampler=ode", "train.lr=1e-4,1", "budget.iterations=30", "eval.every=10")
    assert code == 0  # divergence is a result, not a crash (see test_crashed_cell_exits_nonzero)
    grid = tmp_path / "smoke"
    st = read_status(grid / "elbo-ode-lr=1-seed0")
    assert st["status"] == "diverged" and st["error"].startswith(f"non-finite {st['quantity']} at iteration")
    assert read_status(grid / "elbo-ode-lr=1e_4-seed0")["status"] == "done"
    df = pd.read_parquet(grid / "summary.parquet")
    assert set(df[df.status == "diverged"].cell) == {"elbo-ode-lr=1-seed0"}
    assert "elbo-ode-lr=1-seed0" in (grid / "report.md").read_text()


def test_compute_meter_counts_by_hand(tmp_path):
    # stepwise, 8 prompts x 8 samples x 10 SDE steps: 640 rollout forwards, 640 fwd+bwd per epoch (x3).
    assert _run(tmp_path, "estimator=stepwise", "sampler=flow_sde", "budget.iterations=1", "train.minibatches=1") == 0
    row = read_metrics(tmp_path / "smoke" / "stepwise-flow_sde-seed0")[1]
    assert row["rollout_forwards"] == 640 and row["train_backwards"] == 640 and row["nfe_iter"] == 640 + 3 * 640
    assert row["reward_calls"] == 64
    # elbo J=4, two minibatches of 32 samples: 256 fwd+bwd; the first minibatch's old ELBO is its own value (no
    # update yet), the second's costs 32 x 4 no-grad forwards with the old parameters.
    assert _run(tmp_path / "e", "estimator=elbo", "sampler=ode", "budget.iterations=1", "train.minibatches=2") == 0
    row = read_metrics(tmp_path / "e" / "smoke" / "elbo-ode-seed0")[1]
    assert row["train_forwards"] == 384 and row["train_backwards"] == 256 and row["nfe_iter"] == 640 + 128 + 768


@pytest.mark.slow  # CI runs it (python -m pytest -m slow); the default suite stays under 5 min
def test_rerun_skips_done_cells(tmp_path):
    assert _run(tmp_path, "budget.iterations=2") == 0
    cell = tmp_path / "smoke" / "elbo-ode-seed0" / "metrics.jsonl"
    before = (cell.stat().st_mtime_ns, cell.read_text())
    assert _run(tmp_path, "budget.iterations=2") == 0
    assert (cell.stat().st_mtime_ns, cell.read_text()) == before
    assert json.loads((tmp_path / "smoke" / "base" / "metrics.json").read_text())["eval_accuracy"] > 0


def test_crashed_cell_exits_nonzero(tmp_path, monkeypatch):
    """A cell that raises anything but a non-finite loss is a bug: recorded as failed, and the exit code is 1."""
    from estimators.elbo import ELBOEstimator

    def broken(self, *args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(ELBOEstimator, "estimate", broken)
    assert _run(tmp_path, "budget.iterations=1") == 1
    grid = tmp_path / "smoke"
    assert read_status(grid / "elbo-ode-seed0") == {"status": "failed", "error": "RuntimeError: boom"}
    assert read_status(grid / "stepwise-flow_sde-seed0")["status"] == "done"
