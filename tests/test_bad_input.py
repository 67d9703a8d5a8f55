"""Bad input exits non-zero with a one-line message and leaves existing results untouched: a grid with an unknown
axis, a zero budget, a results folder that is not writable, a results folder of another results format."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bench import store
from bench.run import main
from runner_helpers import ONE_CELL, digits_cache, finished_grid, snapshot  # noqa: F401


@pytest.fixture()
def existing(finished_grid: Path) -> Path:
    return finished_grid


def one_line_error(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1 and err.startswith("error: "), (rc, err)
    return err


@pytest.mark.parametrize("bad,expect", [
    (["+grid.axes.learning_rate=[1e-3,1e-4]"], "unknown axis 'learning_rate'"),
    (["budget.iterations=0"], "budget.iterations=0 must be > 0"),
    (["budget.iterations=null"], "no budget set"),
    (["budget.nfe=0", "budget.iterations=null"], "budget.nfe=0 must be > 0"),
    (["launcher=slurm", "launcher.gpus_per_node=3"], "must be a multiple of the 3 data-parallel processes"),
    (["launcher=nowhere"], "unknown launcher 'nowhere'"),
])
def test_bad_grid_or_budget_leaves_results_untouched(capsys: pytest.CaptureFixture, existing: Path,
                                                     bad: list[str], expect: str) -> None:
    before = snapshot(existing)
    assert expect in one_line_error(capsys, [*ONE_CELL, f"results_dir={existing}", *bad])
    assert snapshot(existing) == before


def test_bad_input_creates_no_results_folder(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    one_line_error(capsys, [*ONE_CELL, f"results_dir={tmp_path / 'new'}", "budget.iterations=0"])
    assert not (tmp_path / "new").exists()


def test_results_dir_that_is_a_file(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    f = tmp_path / "results"
    f.write_text("not a folder")
    assert "not writable" in one_line_error(capsys, [*ONE_CELL, f"results_dir={f}"])
    assert "not writable" in one_line_error(capsys, [*ONE_CELL, f"results_dir={f / 'sub'}"])
    assert f.read_text() == "not a folder"


def _make_unwritable(paths: list[Path]) -> Callable[[], None]:
    """Make these folders unwritable for this process; returns the undo. Permission bits for a normal user; root
    ignores them, so for root the folders are made immutable (chattr +i), or the test is skipped."""
    if os.geteuid() != 0:
        for p in paths:
            os.chmod(p, 0o555)
        return lambda: [os.chmod(p, 0o755) for p in paths]
    chattr = shutil.which("chattr")
    if chattr is None or subprocess.run([chattr, "+i", *map(str, paths)], capture_output=True).returncode != 0:
        subprocess.run([chattr or "true", "-i", *map(str, paths)], capture_output=True)
        pytest.skip("running as root on a filesystem without chattr +i: no way to make a folder unwritable")
    return lambda: subprocess.run([chattr, "-i", *map(str, paths)], check=True)


@pytest.fixture()
def readonly_results(tmp_path: Path, existing: Path) -> Iterator[Path]:
    """A copy of the finished grid in folders this process may not write."""
    res = tmp_path / "results"
    shutil.copytree(existing, res, ignore=shutil.ignore_patterns("cache"))
    undo = _make_unwritable([d for d in [res, *res.rglob("*")] if d.is_dir()])
    try:
        yield res
    finally:
        undo()


def test_unwritable_results_folder(capsys: pytest.CaptureFixture, readonly_results: Path) -> None:
    before = snapshot(readonly_results)
    err = one_line_error(capsys, [*ONE_CELL, f"results_dir={readonly_results}", "budget.iterations=4"])
    assert err.startswith("error: results folder") and "not writable" in err
    assert snapshot(readonly_results) == before


def test_results_of_another_format_are_refused(capsys: pytest.CaptureFixture, tmp_path: Path, existing: Path) -> None:
    res = tmp_path / "results"
    shutil.copytree(existing, res, symlinks=True)
    (res / "smoke" / store.VERSION_FILE).write_text(json.dumps({"results_format": 99, "bench_version": "9.0.0"}))
    before = snapshot(res)
    err = one_line_error(capsys, [*ONE_CELL, f"results_dir={res}", "budget.iterations=4"])
    assert "results format 99" in err and "9.0.0" in err and f"results format {store.RESULTS_FORMAT}" in err
    assert snapshot(res) == before
    from bench.report import main as report_main

    assert report_main([str(res / "smoke")]) == 2
    assert "results format 99" in capsys.readouterr().err
    assert snapshot(res) == before
