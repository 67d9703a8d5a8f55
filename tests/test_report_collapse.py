"""The report on a grid folder written by hand (no training): one seed collapses after peaking and is flagged,
per-seed detectors against the real digits' values, every cell of the folder covered (unfinished, pending,
diverged), bit-identical methods merged, and a summary whose sentences carry ratios with intervals and no n/a."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from bench.runner import store
from bench.reporting.collapse import fell_from_peak, seed_signs
from bench.runner.grid import Cell
from bench.reporting.report import main as report_main
from bench.reporting.report import render_report
from bench.reporting.report_sections import sensitivity_section
from bench.reporting.summary import refresh_summary, write_manifest
from bench.worlds import WORLDS
from bench.worlds.digits import DigitsWorld

NFE = [0, 20_000, 40_000, 60_000, 80_000, 100_000]
BASE = {"eval_reward": 0.30, "eval_accuracy": 0.31, "eval_heldout_accuracy": 0.28, "eval_diversity": 0.90,
        "eval_nearest_real": 0.67}


def curve(acc: list[float], diversity: list[float] | None = None, near: list[float] | None = None,
          held_gap: float = 0.03) -> list[dict]:
    diversity = diversity or [0.9 - 0.05 * i for i in range(len(acc))]
    near = near or [0.67 - 0.02 * i for i in range(len(acc))]
    return [{"iteration": 10 * i, "nfe": n, "device_hours": n / 1e9, "wall_s": n / 1e4, "eval_reward": a,
             "eval_accuracy": a, "eval_heldout_accuracy": a - held_gap, "eval_diversity": d, "eval_nearest_real": r}
            for i, (n, a, d, r) in enumerate(zip(NFE, acc, diversity, near))]


def write_cell(grid: Path, name: str, estimator: str, seed: int, rows: list[dict], status: dict | None) -> None:
    d = grid / name
    d.mkdir(parents=True)
    cfg = {"world": {"name": "digits"}, "estimator": {"name": estimator}, "sampler": {"name": "flow_sde"},
           "objective": {"name": "grpo_clip"}, "train": {"lr": 3e-4}, "seed": seed}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    for r in rows:
        store.append_metrics(d, r)
    if status is not None:
        store.write_status(d, **status)


def build_grid(root: Path) -> Path:
    """estimator {stepwise, elbo} x objective {grpo_clip, epg} (epg bit-identical to grpo_clip), 3 seeds; elbo
    seed 2 peaks at 0.95 and collapses to 0.11 with diversity 0.03; one extra cell unfinished, one pending."""
    grid = root / "g"
    grid.mkdir()
    (grid / "grid.yaml").write_text(yaml.safe_dump({
        "name": "g", "budget_text": "nfe=100000", "baseline": {"estimator": "stepwise", "objective": "grpo_clip"},
        "report": {"metric": "eval_accuracy", "threshold": 0.8, "thresholds": [0.5, 0.8],
                   "contrasts": [{"axis": "estimator", "levels": ["elbo", "stepwise"], "why": "the estimator alone"}],
                   "device_seconds": True}}))
    (grid / "base").mkdir()
    (grid / "base" / "metrics.json").write_text(json.dumps(BASE))
    cells = []
    for est in ("stepwise", "elbo"):
        for obj in ("grpo_clip", "epg"):
            for seed in range(3):
                name = f"{est}-{obj}-seed{seed}"
                if est == "stepwise":
                    acc = [0.31, 0.35 + 0.01 * seed, 0.42, 0.5, 0.55 + 0.01 * seed, 0.6]
                    rows = curve(acc)
                elif seed == 2:  # peaks, then one glyph per prompt
                    rows = curve([0.31, 0.6, 0.85, 0.95, 0.4, 0.11], diversity=[0.9, 0.7, 0.6, 0.5, 0.1, 0.03])
                else:
                    rows = curve([0.31, 0.55 + 0.02 * seed, 0.8, 0.9 + 0.01 * seed, 0.93, 0.95])
                write_cell(grid, name, est, seed, rows, {"status": "done"})
                cells.append(Cell(name, f"{est}-{obj}", seed, {"estimator": est, "objective": obj}, [], None, None,
                                  {"estimator": est, "objective": obj}))
    write_cell(grid, "elbo-par-seed0", "elbo", 0, curve([0.31, 0.5, 0.6])[:3], {"status": "interrupted"})
    cells.append(Cell("elbo-par-seed0", "elbo-par", 0, {"estimator": "elbo", "objective": "par"}, [], None, None, {}))
    cells.append(Cell("elbo-par-seed1", "elbo-par", 1, {"estimator": "elbo", "objective": "par"}, [], None, None, {}))
    write_manifest(grid, cells)
    store.write_results_version(grid)
    return grid


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    grid = build_grid(tmp_path_factory.mktemp("collapse"))
    assert report_main([str(grid)]) == 0
    return grid, (grid / "report.md").read_text()


def test_collapsed_seed_is_flagged(report: tuple[Path, str]) -> None:
    _, md = report
    section = md.split("## Collapse and reward-hacking check (per seed)")[1].split("\n## ")[0]
    flagged = [ln for ln in section.splitlines() if ln.startswith("- `")]
    # elbo-grpo_clip seed 2 and its bit-identical epg twin; nobody else.
    assert {re.match(r"- `([^`]+)`", ln).group(1) for ln in flagged} == {"elbo-grpo_clip-seed2", "elbo-epg-seed2"}
    line = next(ln for ln in flagged if "elbo-grpo_clip-seed2" in ln)
    assert "fell from its peak 0.95" in line and "to 0.11" in line
    assert "diversity collapsed: diversity 0.03 < 0.5 x the real data's 0.56" in line
    assert "1/3 seeds flagged" in md.split("## Methods")[1]


def test_summary_first_with_ratios_and_no_na(report: tuple[Path, str]) -> None:
    _, md = report
    first = md.split("## Methods")[0]
    assert first.index("## Summary") < first.index("![headline")
    assert "n/a" not in first
    # elbo reaches 0.5 first: per seed stepwise needs 80k - 20k*(0.05-0.01*s)/0.08 ... both ratio and interval printed
    assert re.search(r"\*\*estimator\*\*: `elbo` reaches accuracy 0\.\d+ with \d\.\d\dx \[\d\.\d\d, \d\.\d\d\] fewer NFE "
                     r"than `stepwise`", first), first
    assert "**objective**: `epg` and `grpo_clip` are bit-identical" in first
    assert "matters most" in first
    contrast = next(ln for ln in first.splitlines() if "in device-seconds" in ln)
    assert re.search(r"in device-seconds \(noisy on a shared CPU\) \d+\.\d\dx \[", contrast)
    assert contrast.endswith("(the estimator alone).")
    assert "## device-seconds to reach eval_accuracy thresholds" in md
    assert (report[0] / "headline.png").stat().st_size > 10_000


def test_every_cell_of_the_folder_is_covered(report: tuple[Path, str]) -> None:
    grid, md = report
    cells = md.split("## Cells")[1]
    assert "- `elbo-par-seed0`: unfinished at iteration 20" in cells
    assert "- `elbo-par-seed1`: not started" in cells
    df = pd.read_parquet(grid / "summary.parquet")
    assert set(df.cell) == {"base", "elbo-par-seed0", "elbo-par-seed1",
                            *(f"{e}-{o}-seed{s}" for e in ("stepwise", "elbo") for o in ("grpo_clip", "epg") for s in range(3))}
    # An unfinished cell's figures are not final: it is in no method row.
    assert "elbo-par" not in md.split("## Methods")[1].split("## NFE to reach")[0]


def test_identical_methods_reported_once(report: tuple[Path, str]) -> None:
    _, md = report
    table = md.split("## Methods")[1].split("## NFE to reach")[0]
    rows = [ln for ln in table.splitlines() if ln.startswith("| ") and "method" not in ln]
    assert len(rows) == 2
    assert "**stepwise-grpo_clip** (baseline) ≡ `stepwise-epg`" in rows[0]
    assert rows[1].startswith("| `elbo-grpo_clip` ≡ `elbo-epg`")


def test_detectors_by_hand() -> None:
    assert fell_from_peak(np.array([0, 1, 2]), np.array([0.3, 0.9, 0.55]), "eval_accuracy") is not None  # lost 58%
    assert fell_from_peak(np.array([0, 1, 2]), np.array([0.3, 0.9, 0.65]), "eval_accuracy") is None  # lost 42%
    assert fell_from_peak(np.array([0, 1]), np.array([0.3, 0.2]), "eval_accuracy") is None  # never rose: no peak
    dets = DigitsWorld.detectors()
    # Healthy: diversity 0.45 (> 0.28), nearest-real 0.55 falling, judges together.
    ok = pd.DataFrame(curve([0.31, 0.6, 0.9], diversity=[0.9, 0.6, 0.45], near=[0.67, 0.6, 0.55]))
    assert seed_signs(ok, "eval_accuracy", dets) == []
    # ELBO at lr 1e-3 in issue 11: accuracy 0.14, nearest-real 0.89 -- no rise in reward needed.
    hacked = pd.DataFrame(curve([0.31, 0.4, 0.14], diversity=[0.9, 0.8, 0.6], near=[0.67, 0.6, 0.89]))
    signs = seed_signs(hacked, "eval_accuracy", dets)
    assert any(s.startswith("samples left the real digits: nearest real 0.89 (real data 0.26") for s in signs)
    gap = pd.DataFrame(curve([0.31, 0.6, 0.84], held_gap=0.03))
    gap.loc[2, "eval_heldout_accuracy"] = 0.43  # gap 0.41 vs 0.03 at the start
    assert any("accuracy minus heldout accuracy grew from +0.03 to +0.41" in s for s in seed_signs(gap, "eval_accuracy", dets))


def test_world_without_detectors_claims_nothing(tmp_path: Path) -> None:
    grid = build_grid(tmp_path)
    refresh_summary(grid, "g")
    md = render_report(pd.read_parquet(grid / "summary.parquet"), yaml.safe_load((grid / "grid.yaml").read_text()),
                       "g", grid, world=WORLDS.get("sd3"))
    assert "World `sd3` declares no collapse or reward-hacking detectors" in md
    assert "no sign" not in md.lower() and "diversity collapsed" not in md
    header = next(ln for ln in md.split("## Methods")[1].splitlines() if ln.startswith("| method"))
    # sd3 declares eval_reward only: the digits judges' columns are not shown.
    assert "final reward" in header and "diversity" not in header and "heldout" not in header


def test_real_digits_reference_values() -> None:
    # Issue 11's figures for real digits: nearest-real 0.26 (leave-one-out), within-digit diversity 0.56.
    ref = DigitsWorld.reference_values()
    assert ref["eval_nearest_real"] == pytest.approx(0.26, abs=0.005)
    assert ref["eval_diversity"] == pytest.approx(0.56, abs=0.005)


def test_sensitivity_flags_a_best_value_at_the_edge() -> None:
    # lr sweep 1e-4, 3e-4, 1e-3 under two samplers: the best AUC is in the middle under one and at the top under
    # the other.
    rows = []
    for sampler, aucs in (("ode", (0.4, 0.7, 0.5)), ("sde", (0.3, 0.5, 0.6))):
        for lr, auc in zip(("1e-4", "3e-4", "1e-3"), aucs):
            rows += [{"axis:train.lr": lr, "axis:sampler": sampler, "seed": s, "auc": auc + 0.01 * s} for s in range(3)]
    lines = sensitivity_section(pd.DataFrame(rows), "eval_accuracy")
    assert lines[1] == "## Sensitivity to train.lr"
    ode = next(ln for ln in lines if ln.startswith("| ode |"))
    sde = next(ln for ln in lines if ln.startswith("| sde |"))
    assert ode.endswith("| 3e-4 |") and "**0.710 [" in ode
    assert sde.endswith("| 1e-3 (at the edge) |")
