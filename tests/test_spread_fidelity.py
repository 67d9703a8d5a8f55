"""The factor-spread analysis by hand, and the estimator fidelity lab end to end on a tiny setting."""
from __future__ import annotations

import numpy as np
import pandas as pd

from bench import run
from bench.reporting.spread import factor_spread, spread_section
from runner_helpers import digits_cache, results_dir  # noqa: F401 (session fixture: one digits cache)


def _table(values: dict[tuple[str, str], list[float]]) -> pd.DataFrame:
    return pd.DataFrame([{"x": x, "y": y, "value": v} for (x, y), vs in values.items() for v in vs])


def test_factor_spread_by_hand():
    # x (estimator) shifts everything by 0.4, y (objective) by at most 0.1; the y=c level exists under x=a only.
    cells = {("a", "p"): [0.9, 0.9], ("a", "q"): [0.8, 0.8], ("a", "c"): [0.0, 0.0],
             ("b", "p"): [0.5, 0.5], ("b", "q"): [0.45, 0.45]}
    res = factor_spread(_table(cells), "x", "y")
    assert res["x_levels"] == ["a", "b"] and res["y_levels"] == ["p", "q"]  # c dropped: missing under b
    sx, sy, diff = res["point"]
    assert np.isclose(sx, (0.4 + 0.35) / 2)          # across x within p, within q
    assert np.isclose(sy, (0.1 + 0.05) / 2)          # across y within a, within b
    assert np.isclose(diff, sy - sx)
    # Identical seeds: no bootstrap spread, so the CI collapses onto the point.
    assert np.allclose(res["lo"], res["point"]) and np.allclose(res["hi"], res["point"])


def test_spread_section_verdict():
    rng = np.random.default_rng(0)
    rows = []
    for est, shift in (("elbo", 0.9), ("stepwise", 0.5)):
        for obj, d in (("epg", 0.0), ("grpo", 0.02), ("par", -0.01)):
            for seed in range(3):
                acc = shift + d + rng.normal(0, 0.01)
                rows.append({"cell": f"{est}-{obj}-{seed}", "seed": seed, "axis:estimator": est, "axis:objective": obj,
                             "eval_accuracy": acc, "nfe_to_threshold": np.nan, "final_nfe": 100.0})
    seeds = pd.DataFrame(rows)
    df = pd.DataFrame([{"cell": r["cell"], "nfe": n, "eval_accuracy": r["eval_accuracy"] * n / 100}
                       for r in rows for n in (0.0, 50.0, 100.0)])
    text = "\n".join(spread_section(df, seeds, "eval_accuracy"))
    assert "| final eval_accuracy | 0.4" in text and "estimator spreads more" in text


def test_fidelity_lab_end_to_end(tmp_path, digits_cache):
    res = results_dir(tmp_path, digits_cache)
    code = run.main(["grid=estimator_fidelity", f"results_dir={res}", "grid.updates=[1,2]", "grid.samples=8",
                     "grid.repeats=2", "grid.elbo.J=[2]", "grid.elbo.weighting=[uniform]", "grid.elbo.crn=[true,false]",
                     "grid.elbo_extra=[]", "grid.stepwise=[flow_sde]", "grid.exact.steps=8"])
    assert code == 0
    lab = res / "estimator_fidelity"
    table = pd.read_parquet(lab / "fidelity.parquet")
    pooled = table[table["update"] == "all"].set_index("setting")
    assert list(pooled.index) == ["stepwise[flow_sde]", "elbo J=2 uniform crn", "elbo J=2 uniform indep"]
    # NFEs per log-ratio: stepwise recomputes pi_theta on its 10 edges (pi_old is stored); ELBO J=2 evaluates both.
    assert pooled.loc["stepwise[flow_sde]", "nfe_per_estimate"] == 10
    assert pooled.loc["elbo J=2 uniform crn", "nfe_per_estimate"] == 4
    assert pooled.loc["stepwise[flow_sde]", "draw_std"] == 0  # a stored path has no randomness to redraw
    samples = pd.read_parquet(lab / "samples.parquet")
    assert len(samples) == 2 * 8 * (1 + 2 + 2)  # updates x samples x (stepwise once, two ELBO settings twice)
    assert (lab / "scatter.png").stat().st_size > 0
    md = (lab / "report.md").read_text()
    assert "Stepwise rows estimate the path log-ratio" in md
    # The headline statistics are per update count, never pooled over them.
    assert "- After 1 update: the best rank agreement" in md and "- After 2 updates:" in md
    assert "Spearman @1 |" in md and "pooled" not in md.split("## Estimators")[1].split("\n")[2]
    html = (lab / "report.html").read_text()
    assert "<table>" in html and 'src="data:image/png;base64,' in html
