"""`python -m bench.run grid=smoke world=sd15 world.variant=tiny`: the sd15 code path end to end on a CPU."""
from __future__ import annotations

import json

import pytest
from runner_helpers import cli


@pytest.mark.slow  # 36 s; CI runs it (python -m pytest -m slow)
def test_smoke_grid_on_tiny_sd15(tmp_path):
    res = cli(["grid=smoke", "world=sd15", "world.variant=tiny", f"results_dir={tmp_path}"], timeout=900)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    grid = tmp_path / "smoke"
    done = sorted(p.parent.name for p in grid.glob("*-seed0/status.json") if json.loads(p.read_text())["status"] == "done")
    assert done == ["elbo-ode-seed0"]  # the ODE sampler is deterministic DDIM on the VP model
    # The flow-matching SDE cannot roll out an epsilon-prediction UNet: skipped with its reason, never run.
    out = res.stdout + res.stderr
    assert "flow-matching" in out and not (grid / "stepwise-flow_sde-seed0" / "status.json").exists()
    rows = [json.loads(line) for line in (grid / "elbo-ode-seed0" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["iteration"] == 4 and all(r["nfe"] >= 0 for r in rows)
    assert (grid / "elbo-ode-seed0" / "samples").exists() and (grid / "report.md").exists()
