"""Statistics (IQM, stratified bootstrap, probability of improvement, Pareto front) and reports: report.md and a
self-contained report.html regenerated from the results folder, several grids in one report, a Chromium render."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from bench.runner import store
from bench.reporting.report import main as report_main
from bench.reporting.report_html import find_chromium, markdown_to_html, render_png
from bench.reporting.stats import (bootstrap_ci, compute_to_threshold, iqm, pareto_front, probability_of_improvement,
                         stratified_bootstrap_ci)
from runner_helpers import digits_cache, finished_grid, results_dir, run_runner, snapshot  # noqa: F401


def test_iqm_and_bootstrap() -> None:
    assert iqm([1, 2, 3, 4, 100, 5, 6, 7]) == pytest.approx(np.mean([3, 4, 5, 6]))
    assert iqm([1, 2, 3]) == pytest.approx(2.0)  # below 4 values nothing is trimmed
    mean, lo, hi = bootstrap_ci([1.0, 2.0, 3.0, 4.0, 5.0], n_resamples=4000)
    assert mean == 3.0 and 1.0 <= lo < 3.0 < hi <= 5.0
    assert bootstrap_ci([0.7]) == (0.7, 0.7, 0.7)
    assert all(np.isnan(bootstrap_ci([])))


def test_stratified_bootstrap_resamples_within_strata() -> None:
    # Stratum 2 has one run: it is constant under resampling, so the pooled mean moves only with stratum 1.
    point, lo, hi = stratified_bootstrap_ci([[1.0, 2.0, 3.0], [10.0]], "mean", n_resamples=4000)
    assert point == 4.0 and lo == pytest.approx((3 + 10) / 4, abs=0.1) and hi == pytest.approx((9 + 10) / 4, abs=0.1)
    point, lo, hi = stratified_bootstrap_ci([[1, 2, 3, 4, 100], [2, 3]], "iqm")
    assert point == pytest.approx(np.mean([2, 2, 3, 3, 4]))


def test_probability_of_improvement() -> None:
    assert probability_of_improvement([[3, 4, 5]], [[0, 1, 2]]) == (1.0, 1.0, 1.0)
    assert probability_of_improvement([[1, 1]], [[1, 1]])[0] == 0.5  # ties count half
    p, lo, hi = probability_of_improvement([[1, 3]], [[2, 2]])
    assert p == 0.5 and lo <= 0.5 <= hi
    # Averaged over tasks: task 1 says always better, task 2 never.
    assert probability_of_improvement([[5], [0]], [[1], [1]])[0] == 0.5


def test_pareto_front_and_threshold() -> None:
    points = {"cheap": (1.0, 0.5), "best": (2.0, 0.9), "worse": (2.0, 0.4), "cheapest": (0.5, 0.2),
              "late": (3.0, 0.9), "broken": (float("nan"), 1.0)}
    assert pareto_front(points) == ["cheapest", "cheap", "best"]
    assert compute_to_threshold([0, 10, 20], [0.1, 0.5, 0.9], 0.7) == pytest.approx(15.0)
    assert np.isnan(compute_to_threshold([0, 10], [0.1, 0.2], 0.5))


def test_markdown_to_html_embeds_images_and_escapes(tmp_path: Path) -> None:
    from PIL import Image

    Image.new("L", (4, 4), 128).save(tmp_path / "a.png")
    md = ("# Title `x`\n\ntext with <script> and **bold**\n\n| a | b |\n|---|---|\n| ![img](a.png)<br>cap | `c|d` |\n\n"
          "- item [link](https://example.org)\n\n<details><summary>cfg</summary>\n\n```yaml\nk: <v>\n```\n\n</details>\n"
          "![gone](missing.png)\n")
    html = markdown_to_html(md, tmp_path, "t")
    assert "data:image/png;base64," in html and "&lt;script&gt;" in html and "<strong>bold</strong>" in html
    assert "<br>" in html and "<details>" in html and "k: &lt;v&gt;" in html and "missing image: missing.png" in html
    assert not re.search(r'src="(?!data:)', html)
    two = markdown_to_html("| a |\n|---|\n| 1 |\n| b | c |\n|---|---|\n| 2 | 3 |\n", tmp_path, "t")
    assert two.count("<table>") == 2 and "<th>b</th>" in two  # a header right after a table starts a new one


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory, digits_cache: Path) -> Path:
    """The smoke grid (three methods, one combination skipped) over two seeds, 2 iterations each."""
    res = results_dir(tmp_path_factory.mktemp("report"), digits_cache)
    assert run_runner(["grid=smoke", "budget.iterations=2", "eval.every=1", "grid.seeds=[0,1]",
                       f"results_dir={res}"]) == 0
    return res / "smoke"


def test_report_regenerates_md_and_self_contained_html(grid: Path) -> None:
    # A cell that failed, recorded after the run: the regenerated report must pick it up from the cell folder.
    store.write_status(grid / "elbo-ode-seed1", "failed", error="RuntimeError: injected for the test")
    for f in ("report.md", "report.html", "pareto_nfe.png", "summary.parquet"):
        (grid / f).unlink()
    cells_before = {k: v for k, v in snapshot(grid).items() if "/" in k and not k.startswith("base/lock")}
    assert report_main([str(grid)]) == 0
    md, html = (grid / "report.md").read_text(), (grid / "report.html").read_text()
    for section in ("## Summary", "## Methods", "## Aggregate statistics", "## Pareto front over learning curves",
                    "## Samples", "## Configs", "## Cells"):
        assert section in md, section
    assert md.index("## Summary") < md.index("![headline") < md.index("## Methods")
    assert "skipped `stepwise-ode`: estimator 'stepwise' needs SDE edges" in md
    assert "- failed `elbo-ode-seed1`: RuntimeError: injected for the test" in md
    assert "IQM final eval_accuracy" in md and "P(method > `stepwise-flow_sde`)" in md
    assert "| `elbo-flow_sde` | estimator=elbo (baseline: stepwise) |" in md
    # Self-contained: every image inline; the headline and two compute plots, one sample grid per method.
    assert not re.search(r'src="(?!data:)', html)
    assert html.count('src="data:image/png;base64,') >= 3 + 3
    # Full configs only in the HTML's collapsibles; report.md lists the differences.
    assert "<details><summary>full config of <code>elbo-ode</code>" in html and "estimator:" in html
    assert "estimator:\n" not in md
    assert (grid / "pareto_nfe.png").stat().st_size > 10_000
    assert {k: v for k, v in snapshot(grid).items() if k in cells_before} == cells_before, "no cell was touched"


def test_report_of_several_grids(grid: Path, tmp_path: Path, finished_grid: Path) -> None:
    other = tmp_path / "b"
    shutil.copytree(finished_grid, other, symlinks=True)
    out = tmp_path / "compare"
    assert report_main([str(grid), str(other / "smoke"), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert md.startswith("# Comparison of grids") and "## Across grids" in md
    assert md.count("## Grid `") == 2 and "pooled IQM" in md
    # elbo-ode: one run in the second grid (and one or two in the first, as the test above failed seed 1 or
    # not); elbo-flow_sde: two runs in the first grid and none in the second (ONE_CELL is elbo-ode only).
    row = next(ln for ln in md.splitlines() if ln.startswith("| `elbo-ode` |"))
    assert "(1)" in row
    row = next(ln for ln in md.splitlines() if ln.startswith("| `elbo-flow_sde` |"))
    assert "(2)" in row and "—" in row
    html = (out / "report.html").read_text()
    assert "missing image" not in html and not re.search(r'src="(?!data:)', html)


@pytest.mark.skipif(find_chromium() is None, reason="no Chromium (Debian: apt-get install chromium)")
def test_html_renders_in_headless_chromium(grid: Path, tmp_path: Path) -> None:
    from PIL import Image

    if not (grid / "report.html").exists():
        assert report_main([str(grid)]) == 0
    png = render_png(grid / "report.html", tmp_path / "report.png", height=2400)
    img = np.asarray(Image.open(png).convert("L"))
    assert img.shape == (2400, 1400)
    assert (img < 128).mean() > 0.01 and (img > 200).mean() > 0.5  # text, tables and plots on a white page


def test_report_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert report_main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no results" in err
    (tmp_path / "cells.json").write_text(json.dumps([]))
    assert report_main([str(tmp_path)]) == 2
    assert "no grid.yaml" in capsys.readouterr().err
