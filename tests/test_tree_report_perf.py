"""The report's cost-per-iteration section (tree_vs_trajectory) and the rollout benchmark's table."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from bench import perf
from bench.reporting.report import cost_per_iteration, cost_section, fewer_verdict


def test_cost_per_iteration_from_last_eval_row():
    df = pd.DataFrame([
        {"cell": "base", "method": "base", "seed": -1, "iteration": 0, "nfe": 0, "wall_s": 0.0, "device_hours": 0.0, "eval_reward": 0.3},
        {"cell": "t-0", "method": "t", "seed": 0, "iteration": 0, "nfe": 0, "wall_s": 0.0, "device_hours": 0.0, "eval_reward": 0.3},
        {"cell": "t-0", "method": "t", "seed": 0, "iteration": 10, "nfe": 12000, "wall_s": 3.0, "device_hours": 3.0 / 3600, "eval_reward": 0.5},
        {"cell": "t-0", "method": "t", "seed": 0, "iteration": 20, "nfe": 25000, "wall_s": 8.0, "device_hours": 8.0 / 3600, "eval_reward": 0.6},
    ])
    cost = cost_per_iteration(df)
    assert len(cost) == 1
    row = cost.iloc[0]
    assert (row.iterations, row.s_per_iter, row.nfe_per_iter) == (20, 0.4, 1250)
    assert row.device_s_per_iter == pytest.approx(0.4)


def test_fewer_verdicts():
    nan = math.nan
    assert fewer_verdict(np.array([1.0, 1.1, 1.2]), np.array([3.0, 3.1, 3.2])).endswith("yes, 2.8x fewer (CIs disjoint)")  # 3.1 / 1.1
    assert fewer_verdict(np.array([3.0, 3.1, 3.2]), np.array([1.0, 1.1, 1.2])).endswith("no, 2.8x more (CIs disjoint)")
    assert fewer_verdict(np.array([1.0, 3.0, 2.0]), np.array([2.5, 1.5, 2.2])).endswith("lower mean but CIs overlap: not shown")
    assert fewer_verdict(np.array([1.0, nan, 2.0]), np.array([2.0, 2.0, 2.0])) == "no: reached in 2/3 seeds only"
    assert fewer_verdict(np.array([nan, nan]), np.array([2.0, 2.0])) == "no: never reached (2 seeds)"
    assert fewer_verdict(np.array([1.0, 1.0]), np.array([2.0, nan])).endswith("baseline reached in 1/2 seeds: yes")


def test_cost_section_names_the_baseline():
    df = pd.DataFrame([{"cell": f"{m}-{s}", "method": m, "seed": s, "iteration": 10, "nfe": n * 10, "wall_s": 1.0,
                        "device_hours": 1 / 3600, "eval_reward": 0.9} for m, n in (("a", 100), ("b", 300)) for s in (0, 1)])
    seeds = pd.DataFrame([{"method": m, "nfe_to_threshold": v, "hours_to_threshold": v / 1e6}
                          for m, vals in (("a", (10.0, 11.0)), ("b", (30.0, 31.0))) for v in vals])
    lines = cost_section(df, seeds, "b")
    # no optimizer_steps column in this summary: the steps-per-NFE column says n/a
    assert any(line.startswith("| a | 10 [10, 10] | 0.100 [0.100, 0.100] | 100 [100, 100] | n/a | 10.5 [10, 11] vs 30.5 [30, 31]: yes")
               for line in lines)
    assert any(line.startswith("| b |") and "(baseline)" in line for line in lines)


def test_perf_rollout_prints_the_comparison(tmp_path, capsys):
    rc = perf.main(["rollout", "--prompts", "2", "--repeats", "1", f"results_dir={tmp_path}", "world.pretrain.steps=1"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "| trajectories (flow_sde) | 27 | 540 |" in out            # 2 prompts x 27 chains x 10 steps
    assert "| tree k=3 d=3 s=7 | 27 | 40 |" in out                   # 2 roots x (7 + 13 + 0)
    assert "window drawn (mean over s)** | 27 | 222 |" in out       # 2 x 111
    assert "NFE speed-up 2.43x" in out and "wall speed-up" in out
    assert "tree 78 vs trajectories 1620" in out                     # 2 x 13 parents x 3; 540 x 3
