"""Experiment tracking: off by default; logger=tensorboard / logger=wandb write next to the built-in files; a missing
package fails up front with a one-line install hint."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from bench.runner.config import compose_config
from bench.core.errors import UserError
from bench.runner.loggers import check_logger, logger_name
from bench.run import main
from runner_helpers import ONE_CELL, digits_cache, metrics, results_dir, run_runner  # noqa: F401


def test_off_by_default() -> None:
    assert logger_name(compose_config(["grid=smoke"])) == "none"


@pytest.mark.parametrize("name,module,package", [("wandb", "wandb", "wandb"),
                                                 ("tensorboard", "torch.utils.tensorboard", "tensorboard")])
def test_missing_package_gives_install_hint(name: str, module: str, package: str, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(UserError, match=f"pip install {package}"):
        check_logger(compose_config(["grid=smoke", f"logger={name}"]))
    assert main([*ONE_CELL, f"logger={name}", f"results_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"pip install {package}" in err
    assert not any(tmp_path.iterdir()), "nothing written before the check"


def test_tensorboard_writes_every_row(tmp_path: Path, digits_cache: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    res = results_dir(tmp_path, digits_cache)
    assert run_runner([*ONE_CELL, "logger=tensorboard", f"results_dir={res}"]) == 0
    cell = res / "smoke" / "elbo-ode-seed0"
    acc = EventAccumulator(str(cell / "tensorboard"))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("eval/reward")]
    assert steps == [r["iteration"] for r in metrics(cell)]
    assert [e.value for e in acc.Scalars("eval/reward")] == pytest.approx([r["eval_reward"] for r in metrics(cell)])
    assert "compute/nfe" in acc.Tags()["scalars"]


@pytest.mark.slow  # CI runs it (python -m pytest -m slow); the default suite stays under 5 min
def test_wandb_offline_run(tmp_path: Path, digits_cache: Path) -> None:
    pytest.importorskip("wandb")
    res = results_dir(tmp_path, digits_cache)
    assert run_runner([*ONE_CELL, "logger=wandb", f"results_dir={res}"]) == 0
    assert list((res / "smoke" / "elbo-ode-seed0" / "wandb").glob("offline-run-*"))
