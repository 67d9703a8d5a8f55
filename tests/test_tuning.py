"""The equal-tuning protocol (grid.tune): the sweep per method, selection on tuning seeds by a score computed by
hand, failures counting against a setting, fresh seeds for the comparison, and the report's tuning account."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from omegaconf import OmegaConf

from bench.core.errors import UserError
from bench.run import main as run_main
from bench.runner import store
from bench.runner.grid import expand_grid, mark_invalid
from bench.runner.tuning import TuneSpec, choose, method_templates, run_score, settings_for, tune_spec, tuning_cells

SWEEP = "+grid.tune={params: {train.lr: [1e-4, 1e-3], objective.clip_range: [1e-4, 1e-2]}, seeds: [5, 6]}"


def spec_of(overrides: list[str], seeds=(0,)):
    base, cells = expand_grid("smoke", overrides)
    return base, cells, tune_spec(base, list(seeds))


def test_sweep_covers_only_the_keys_a_method_has() -> None:
    """grpo_clip is swept over lr x clip_range (4 settings), epg over lr only (2): clip_range is not an epg key."""
    _, cells, spec = spec_of(["estimator=elbo", "sampler=ode", "objective=grpo_clip,epg", SWEEP])
    mark_invalid(cells)
    by_method = {t.method: settings_for(t, spec) for t in method_templates(cells)}
    assert by_method["elbo-ode-grpo_clip"] == [{"train.lr": a, "objective.clip_range": b}
                                               for a in (1e-4, 1e-3) for b in (1e-4, 1e-2)]
    assert by_method["elbo-ode-epg"] == [{"train.lr": 1e-4}, {"train.lr": 1e-3}]
    tune = tuning_cells(method_templates(cells), spec)
    assert len(tune) == (4 + 2) * 2  # settings x tuning seeds
    assert {c.seed for c in tune} == {5, 6}
    one = next(c for c in tune if c.setting == {"of": "elbo-ode-grpo_clip", "train.lr": 1e-3, "objective.clip_range": 1e-2})
    assert float(one.cfg.train.lr) == 1e-3 and float(one.cfg.objective.clip_range) == 1e-2
    assert one.cfg.budget.get("until") is None  # tuning runs stop at the fixed budget


@pytest.mark.parametrize("tune, fragment", [
    ("{params: {train.lr: [1e-4]}, seeds: [0]}", "shares seed 0"),
    ("{params: {}, seeds: [5]}", "empty"),
    ("{params: {train.lr: [1e-4]}, seeds: [5], select: best}", "select=best"),
    ("{params: {train.lr: [1e-4]}, seeds: [5], trials: 3}", "grid.tune.trials"),
    ("{params: {seed: [1, 2]}, seeds: [5]}", "not a tunable"),
])
def test_bad_tuning_specs_are_refused(tune: str, fragment: str) -> None:
    with pytest.raises(UserError, match=fragment):
        spec_of([f"+grid.tune={tune}"])


def write_run(d: Path, nfe: list[int], acc: list[float], status: str) -> None:
    d.mkdir(parents=True)
    for n, a in zip(nfe, acc):
        store.append_metrics(d, {"iteration": n // 1000, "nfe": n, "eval_reward": a, "eval_accuracy": a})
    store.write_status(d, status=status)


def test_selection_by_hand(tmp_path: Path) -> None:
    """AUC over [0, 100k] by the trapezoid rule; a diverged run counts 0 after its last eval; a failed run makes
    its setting unselectable; ties go to the first setting of the sweep."""
    x = [0, 50_000, 100_000]
    cells = []
    for lr, runs in {"1e-4": [([0.2, 0.4, 0.6], "done"), ([0.2, 0.8, 0.8], "done")],     # AUC 0.4, 0.65
                     "3e-4": [([0.2, 0.9, 0.9], "done"), ([0.2, 0.9], "diverged")],     # 0.725, (0.55*.5+0) = 0.275
                     "1e-3": [([0.5, 1.0, 1.0], "done"), ([0.5, 1.0, 1.0], "failed")]}.items():
        for seed, (acc, status) in zip((5, 6), runs):
            name = f"tune-m-lr={lr}-seed{seed}"
            write_run(tmp_path / name, x[:len(acc)], acc, status)
            cells.append(type("C", (), {"name": name, "method": f"tune-m-lr={lr}", "skip_reason": None,
                                        "setting": {"of": "m", "train.lr": float(lr)}})())
    spec = TuneSpec({"train.lr": [1e-4, 3e-4, 1e-3]}, [5, 6], "auc", "eval_accuracy", 100_000)
    assert run_score(tmp_path / "tune-m-lr=1e-4-seed5", "eval_accuracy", 100_000, "auc") == pytest.approx(0.4)
    assert run_score(tmp_path / "tune-m-lr=3e-4-seed6", "eval_accuracy", 100_000, "auc") == pytest.approx(0.275)
    assert np.isnan(run_score(tmp_path / "tune-m-lr=1e-3-seed6", "eval_accuracy", 100_000, "auc"))
    chosen = choose(tmp_path, cells, spec)["m"]
    # 1e-4: 0.525 beats 3e-4's 0.5, which would be 0.725 if its diverged seed kept its last value; 1e-3 scores
    # highest but has a failed run.
    assert chosen.setting == {"train.lr": 1e-4}
    scores = {s[0]["train.lr"]: s[1] for s in chosen.scores}
    assert scores[1e-4] == pytest.approx(0.525) and scores[3e-4] == pytest.approx(0.5)
    assert scores[1e-3] == -np.inf


def test_a_kept_score_is_used_only_for_the_metrics_and_question_it_was_computed_for(tmp_path: Path) -> None:
    """run_score keeps each finished run's score beside its metrics: asked again it answers the same without
    reading them, a different metric or budget is scored afresh, and a metrics file that grew is read again."""
    d = tmp_path / "tune-m-lr=1e-4-seed5"
    write_run(d, [0, 50_000, 100_000], [0.2, 0.4, 0.6], "done")
    assert run_score(d, "eval_accuracy", 100_000, "auc") == pytest.approx(0.4)  # trapezoid: (0.3 + 0.5) / 2
    assert (d / ".tuning_score").exists()
    assert run_score(d, "eval_accuracy", 100_000, "auc") == pytest.approx(0.4)
    assert run_score(d, "eval_accuracy", 50_000, "auc") == pytest.approx(0.3)     # (0.2 + 0.4) / 2
    assert run_score(d, "eval_accuracy", 100_000, "final") == pytest.approx(0.6)
    store.append_metrics(d, {"iteration": 150, "nfe": 150_000, "eval_reward": 1.0, "eval_accuracy": 1.0})
    assert run_score(d, "eval_accuracy", 100_000, "final") == pytest.approx(1.0)
    # area over [0, 150k]: 50k * 0.3 + 50k * 0.5 + 50k * 0.8, over the width
    assert run_score(d, "eval_accuracy", 150_000, "auc") == pytest.approx(80_000 / 150_000)


@pytest.fixture(scope="module")
def tuned_grid(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tuned")
    argv = ["grid=smoke", f"results_dir={root}", "estimator=elbo", "sampler=ode", "budget.iterations=2",
            "eval.every=1", "+grid.tune={params: {train.lr: [1e-5, 1e-3]}, seeds: [5]}"]
    assert run_main(argv) == 0
    return root / "smoke"


def test_compared_runs_use_the_chosen_setting_on_fresh_seeds(tuned_grid: Path) -> None:
    spec = TuneSpec({"train.lr": [1e-5, 1e-3]}, [5], "auc", "eval_accuracy", None)
    scores = {lr: run_score(tuned_grid / f"tune-elbo-ode-lr={lr:g}-seed5", "eval_accuracy", None, "auc")
              for lr in (1e-5, 1e-3)}
    best = max(scores, key=scores.get)
    cfg = yaml.safe_load((tuned_grid / "elbo-ode-seed0" / "config.yaml").read_text())
    assert float(cfg["train"]["lr"]) == best and cfg["seed"] == 0
    assert spec.seeds == [5]


def test_report_shows_the_tuning_and_keeps_it_out_of_the_comparison(tuned_grid: Path) -> None:
    md = (tuned_grid / "report.md").read_text()
    assert "## Tuning (equal-tuning protocol)" in md and "**Tuning**" in md
    assert "is the sweep's" in md  # a 2-value sweep's best is always at an edge: flagged
    methods = md.split("## Methods", 1)[1].split("\n## ", 1)[0]
    assert "tune-" not in methods  # tuning runs are not compared


def test_rerun_reuses_tuning_and_compared_cells(tuned_grid: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["grid=smoke", f"results_dir={tuned_grid.parent}", "estimator=elbo", "sampler=ode", "budget.iterations=2",
            "eval.every=1", "+grid.tune={params: {train.lr: [1e-5, 1e-3]}, seeds: [5]}"]
    assert run_main(argv) == 0
    out = capsys.readouterr().out
    assert "0 to run" in out and "1 reused" in out
    cfg = OmegaConf.create(yaml.safe_load((tuned_grid / "grid.yaml").read_text()))
    assert cfg.tune.seeds == [5]


def test_seed_derived_keys_do_not_split_a_method() -> None:
    """A key with one value per seed (`${derived_seed:${seed},1}`) is the seed's stream, not another config; a key
    that differs between cells sharing seeds (two lrs over seeds 0, 1) is, and names the methods apart."""
    from bench.reporting.summary import _distinguish

    rows = [{"cell": f"m-seed{s}", "method": "m", "seed": s} for s in (0, 1, 2)]
    configs = {f"m-seed{s}": {"train.lr": 3e-4, "world.eval.noise_seed": 1000 + s} for s in (0, 1, 2)}
    _distinguish(rows, configs)
    assert {r["method"] for r in rows} == {"m"}
    rows = [{"cell": f"m-{lr}-seed{s}", "method": "m", "seed": s} for lr in (1, 2) for s in (0, 1)]
    configs = {f"m-{lr}-seed{s}": {"train.lr": lr, "world.eval.noise_seed": 1000 + s} for lr in (1, 2) for s in (0, 1)}
    _distinguish(rows, configs)
    assert {r["method"] for r in rows} == {"m [train.lr=1]", "m [train.lr=2]"}
