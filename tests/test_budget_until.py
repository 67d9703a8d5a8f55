"""budget.until: training goes on past the fixed budget until an eval first reaches a value (or a cap), with an eval
where the budget runs out; the report reads final figures and AUC at the budget and first crossings over the run."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from bench.core.errors import UserError
from bench.reporting.findings import run_table
from bench.run import main as run_main
from bench.runner.config import compose_config
from bench.runner.resolve import resolve_cell


@pytest.mark.parametrize("overrides, fragment", [
    (["+budget.until={value: 0.5, cap_nfe: 1000}"], "needs budget.nfe"),
    (["budget.nfe=5000", "+budget.until={value: 0.5, cap_nfe: 5000}"], "cap_nfe=5000: not above"),
    (["budget.nfe=5000", "+budget.until={metric: eval_fid, value: 0.5, cap_nfe: 9000}"], "eval_fid: not an eval metric"),
])
def test_bad_until_is_refused(overrides: list[str], fragment: str) -> None:
    with pytest.raises(UserError, match=fragment):
        resolve_cell(compose_config(["grid=smoke", *overrides]))


def eval_nfes(cell: Path) -> list[int]:
    rows = [json.loads(line) for line in (cell / "metrics.jsonl").read_text().splitlines()]
    return [r["nfe"] for r in rows if "eval_accuracy" in r]


@pytest.mark.parametrize("value, ends", [pytest.param(0.99, "cap", marks=pytest.mark.slow), (0.0, "budget")])
def test_until_extends_to_the_cap_or_stops_at_the_budget(tmp_path: Path, value: float, ends: str) -> None:
    """elbo + ode on the smoke grid spends 1536 NFE per iteration: budget 3000 runs out at iteration 2 (3072 NFE),
    the 6000 cap at iteration 4 (6144). An unreachable value runs to the cap with evals at 0, the budget and the
    end; a value the base already reaches stops at the budget."""
    argv = ["grid=smoke", f"results_dir={tmp_path}", "estimator=elbo", "sampler=ode", "budget.iterations=null",
            "budget.nfe=3000", f"+budget.until={{value: {value}, cap_nfe: 6000}}", "eval.every=1000"]
    assert run_main(argv) == 0
    assert eval_nfes(tmp_path / "smoke" / "elbo-ode-seed0") == ([0, 3072, 6144] if ends == "cap" else [0, 3072])


def test_report_reads_finals_at_the_budget_and_crossings_over_the_run() -> None:
    """A run that crossed 0.8 only after the 100k budget: final accuracy and AUC at 100k, NFE to 0.8 at 150k."""
    nfe, acc = [0, 50_000, 100_000, 150_000], [0.2, 0.4, 0.6, 0.85]
    df = pd.DataFrame({"cell": "m-seed0", "method": "m", "seed": 0, "state": "finished", "state_text": "finished",
                       "iteration": range(4), "nfe": nfe, "device_hours": [n / 1e9 for n in nfe], "eval_reward": acc,
                       "eval_accuracy": acc})
    row = run_table(df, "eval_accuracy", [0.8], budget=100_000).iloc[0]
    assert row.eval_accuracy == 0.6 and row.final_nfe == 100_000
    assert row.auc == pytest.approx((0.3 * 0.5 + 0.5 * 0.5))  # trapezoid over [0, 100k] / 100k
    assert row["reached@0.8"] and row["nfe@0.8"] == pytest.approx(100_000 + 50_000 * (0.2 / 0.25))
    whole = run_table(df, "eval_accuracy", [0.8]).iloc[0]  # no budget: read at the run's end
    assert whole.eval_accuracy == 0.85
