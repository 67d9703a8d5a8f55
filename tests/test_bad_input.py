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

from bench.runner import store
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


# Bad inputs of every kind: types, ranges, closed choices, unknown names and keys, values that would train
# nothing or are ill-defined, CLI flags, and config changes on a finished folder. Each must exit 2 with one line
# naming the value, before anything is written. (expected substring of the error line)
BAD_INPUTS = [
    (["budget.nfe=abc"], "budget.nfe=abc: not an integer"),
    (["seed=abc"], "seed=abc: not an integer"),
    (["seed=1.5"], "seed=1.5: not an integer"),
    (["estimator.J=0"], "estimator.J=0: out of range; valid: 1 <= integer"),
    (["estimator.J=abc"], "estimator.J=abc: not an integer"),
    (["estimator.weighting=foo"], "estimator.weighting=foo: unknown value; valid: uniform, adaptive, t, exact"),
    (["estimator.timesteps=foo"], "estimator.timesteps=foo"),
    (["estimator.noising=trajectory"], "estimator.noising=trajectory"),
    (["estimator.noising=sideways"], "estimator.noising=sideways"),
    (["estimator.time_fraction=0"], "estimator.time_fraction=0: out of range"),
    (["estimator.time_fraction=1.5"], "estimator.time_fraction=1.5: out of range"),
    (["estimator.crn=maybe"], "estimator.crn=maybe: not true or false"),
    (["estimator.reduce=max"], "estimator.reduce=max"),
    (["estimator.t_min=0.9", "estimator.t_max=0.1"], "estimator.t_min=0.9"),
    (["estimator.beta=0"], "estimator.beta=0: out of range"),
    (["+estimator.JJ=3"], "estimator.JJ: unknown key; did you mean estimator.J?"),
    (["train.lr=-1"], "train.lr=-1: out of range; valid: 0 < number"),
    (["train.lr=0"], "train.lr=0: out of range"),
    (["train.lr=abc"], "train.lr=abc: not a number"),
    (["train.lr=nan"], "train.lr=nan: not a finite number"),
    (["train.epochs=0"], "train.epochs=0: out of range"),
    (["train.group_size=0"], "train.group_size=0"),
    (["train.group_size=1"], "train.group_size=1: out of range; valid: 2 <= integer"),
    (["train.prompts_per_iter=0"], "train.prompts_per_iter=0"),
    (["train.minibatches=0"], "train.minibatches=0"),
    (["train.max_grad_norm=0"], "train.max_grad_norm=0"),
    (["train.weight_decay=-1"], "train.weight_decay=-1"),
    (["train.kl_coef=-0.1"], "train.kl_coef=-0.1"),
    (["train.kl_type=foo"], "train.kl_type=foo: unknown value"),
    (["train.old_policy=foo"], "train.old_policy=foo: unknown value; valid: sampling, ema"),
    (["train.ema_decay=1.5"], "train.ema_decay=1.5"),
    (["train.ema_ramp={rate: -1, flat: 0}"], "train.ema_ramp.rate=-1"),
    (["+train.learning_rate=1e-3"], "train.learning_rate: unknown key; did you mean train.lr?"),
    (["budget.iterations=0"], "budget.iterations=0: out of range"),
    (["budget.iterations=null"], "budget: none set"),
    (["budget.nfe=0", "budget.iterations=null"], "budget.nfe=0: out of range"),
    (["budget.device_hours=-1"], "budget.device_hours=-1"),
    (["eval.every=0"], "eval.every=0"),
    (["eval.every_nfe=-5"], "eval.every_nfe=-5"),
    (["checkpoint.every=0"], "checkpoint.every=0"),
    (["lock.heartbeat_s=0"], "lock.heartbeat_s=0"),
    (["sampler.steps=0"], "sampler.steps=0: out of range"),
    (["sampler.guidance=-1"], "sampler.guidance=-1"),
    (["sampler.shift=0"], "sampler.shift=0"),
    (["sampler.train_fraction=0"], "sampler.train_fraction=0"),
    (["sampler=flow_sde", "sampler.sde_window=[5]"], "sampler.sde_window=[5]: needs 2 elements"),
    (["sampler=mix", "sampler.post_compress=2"], "sampler.post_compress=2"),
    (["sampler=mix", "sampler.window.schedule=sideways"], "sampler.window.schedule=sideways"),
    (["sampler=tree", "sampler.branches=0"], "sampler.branches=0"),
    (["advantage.std_eps=-1"], "advantage.std_eps=-1"),
    (["advantage.clip=0"], "advantage.clip=0"),
    (["advantage.global_std=perhaps"], "advantage.global_std=perhaps"),
    (["objective.clip_range=-1"], "objective.clip_range=-1: out of range"),
    (["objective.clip_range=abc"], "objective.clip_range=abc"),
    (["world.pretrain.steps=-1"], "world.pretrain.steps=-1"),
    (["world.eval.samples_per_class=1"], "world.eval.samples_per_class=1"),
    (["world.threads=0"], "world.threads=0"),
    (["world.shift=abc"], "world.shift=abc"),
    (["world.device=cuda"], "world.device=cuda"),
    (["world.reward=no_such_reward"], "unknown reward 'no_such_reward'"),
    (["+world.colour=red"], "world.colour: unknown key"),
    (["+foo=1"], "foo: unknown key"),
    (["results_dir="], "results_dir='': empty"),
    (["grid.seeds=[]"], "grid.seeds=[]: empty"),
    (["grid.seeds=[0,0]"], "grid.seeds=[0, 0]: repeated seed"),
    (["grid.seeds=[a]"], "grid.seeds=['a']: not integers"),
    (["+grid.axes.learning_rate=[1e-3,1e-4]"], "unknown axis 'learning_rate'"),
    (["grid=no_such_grid"], "unknown grid 'no_such_grid'"),
    (["estimator=no_such"], "unknown estimator 'no_such'"),
    (["sampler=no_such"], "unknown sampler 'no_such'"),
    (["objective=no_such"], "unknown objective 'no_such'"),
    (["world=no_such"], "unknown world 'no_such'"),
    (["method=no_such"], "unknown method 'no_such'"),
    (["sampler=no_such_module:Sampler"], "cannot import module 'no_such_module'"),
    (["sampler=bench.core.errors:NoSuchClass"], "has no 'NoSuchClass'"),
    (["estimator=elbo,"], "empty value in sweep"),
    (["launcher=nowhere"], "unknown launcher 'nowhere'"),
    (["launcher=parallel", "launcher.workers=0"], "launcher.workers=0"),
    (["launcher=slurm", "launcher.gpus_per_node=3"], "must be a multiple of the 3 data-parallel processes"),
    (["logger=nowhere"], "unknown logger 'nowhere'"),
    (["hydra.job.chdir=true"], "hydra.job.chdir=true: hydra.* settings do not apply"),
    (["--cfg", "all"], "--cfg all: unknown"),
    (["--bogus"], "--bogus: unknown flag"),
    (["no_equals_sign"], "bad override 'no_equals_sign'"),
    # the finished folder was trained with the defaults: another config never reuses or resumes its cell
    (["train.lr=1e-2"], "was run with another config (train.lr: 0.0003 -> 0.01)"),
    (["budget.iterations=5"], "was run with another config (budget.iterations: 3 -> 5)"),
    (["estimator.J=8"], "was run with another config (estimator.J: 4 -> 8)"),
]


def test_at_least_sixty_bad_inputs() -> None:
    assert len({" ".join(bad) for bad, _ in BAD_INPUTS}) >= 60


@pytest.mark.parametrize("bad,expect", BAD_INPUTS, ids=[" ".join(b) for b, _ in BAD_INPUTS])
def test_bad_input_exits_2_with_one_line_and_leaves_results_untouched(capsys: pytest.CaptureFixture, existing: Path,
                                                                     bad: list[str], expect: str) -> None:
    before = snapshot(existing)
    rc = main([*ONE_CELL, f"results_dir={existing}", *bad])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), (rc, err)
    assert "Traceback" not in err and expect in err, err
    assert snapshot(existing) == before


def test_bad_value_on_the_real_cli(existing: Path) -> None:
    """The same through a real process: exit 2, one line on stderr, no traceback."""
    from runner_helpers import cli

    res = cli([*ONE_CELL, f"results_dir={existing}", "train.lr=-1"])
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0 and "train.lr=-1" in res.stderr, res.stderr


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
    from bench.reporting.report import main as report_main

    assert report_main([str(res / "smoke")]) == 2
    assert "results format 99" in capsys.readouterr().err
    assert snapshot(res) == before
