"""Damage is repaired or named (issue 9, item 8): a torn or truncated metrics.jsonl, a corrupt checkpoint, a corrupt
cache file and a full disk, each on a real results folder; "equal" for metrics means row for row on the non-timing
columns (tests/runner_helpers.py), or byte for byte where the rows come back from a checkpoint."""
from __future__ import annotations

import json
import pickle
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.runner import store
from bench.runner.statefile import CorruptStateFile, load_state, save_state
from runner_helpers import (ONE_CELL, REPO, comparable, digits_cache, finished_grid, metrics, results_dir,  # noqa: F401
                            run_runner, status)

CELL = "elbo-ode-seed0"  # ONE_CELL: 3 iterations, an eval (so a checkpoint) at each; the newest 2 are kept


def killed_before_done(finished_grid: Path, tmp_path: Path, digits_cache: Path) -> Path:
    """A copy of the finished ONE_CELL grid whose cell looks like its runner died after the last checkpoint and
    before writing "done" (status running, its lock gone with the runner): the cell folder."""
    res = results_dir(tmp_path, digits_cache)
    shutil.copytree(finished_grid / "smoke", res / "smoke", symlinks=True)
    cell = res / "smoke" / CELL
    store.write_status(cell, "running")
    return cell


def rerun(cell: Path, log: Path) -> int:
    return run_runner([*ONE_CELL, f"results_dir={cell.parents[1]}"], log=log)


def test_statefile_round_trips_training_state_exactly(tmp_path: Path) -> None:
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        net(torch.randn(4, 3)).pow(2).sum().backward()
        opt.step()
    gen = torch.Generator().manual_seed(7)
    state = {"iteration": 2, "params": {k: v.detach() for k, v in net.state_dict().items()},
             "optimizer": opt.state_dict(), "generator": gen.get_state(), "torch_rng": torch.get_rng_state(),
             "ema": None, "advantage": {"stat_tracking": {"a 7": [0.5, float("nan")]}}, "meter": {"total_nfe": 10**15},
             "odd": {1: (2.5, "x"), "$key": [True, None]}, "half": torch.arange(4, dtype=torch.bfloat16)}
    save_state(state, tmp_path / "s.safetensors")
    back = load_state(tmp_path / "s.safetensors")
    assert back["optimizer"]["param_groups"] == opt.state_dict()["param_groups"]  # betas stay a tuple
    assert back["odd"] == {1: (2.5, "x"), "$key": [True, None]} and back["meter"]["total_nfe"] == 10**15
    assert np.isnan(back["advantage"]["stat_tracking"]["a 7"][1]) and back["ema"] is None
    assert torch.equal(back["generator"], gen.get_state()) and back["half"].dtype == torch.bfloat16
    # The restored optimizer takes the same next step as the original, bit for bit.
    net2 = torch.nn.Linear(3, 2)
    net2.load_state_dict(back["params"])
    opt2 = torch.optim.AdamW(net2.parameters(), lr=1e-2)
    opt2.load_state_dict(back["optimizer"])
    x = torch.randn(4, 3)
    for n, o in ((net, opt), (net2, opt2)):
        o.zero_grad()
        n(x).pow(2).sum().backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), net2.parameters()))


@pytest.mark.parametrize("damage", ["truncated", "bit flip", "not ours"])
def test_statefile_damage_is_detected(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "s.safetensors"
    save_state({"w": torch.arange(1000, dtype=torch.float32), "n": 3}, path)
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "bit flip":
        data[-100] ^= 0x10  # inside the tensor bytes: safetensors itself would not notice
    else:
        data = bytearray(b"PK\x03\x04" + bytes(200))  # e.g. a torch.save zip where a state file should be
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptStateFile) as e:
        load_state(path)
    assert "\n" not in str(e.value)


def test_corrupt_checkpoints_fall_back_to_older_then_scratch(tmp_path: Path) -> None:
    for it in range(3):
        store.append_metrics(tmp_path, {"iteration": it, "loss": 0.5 * it})
        store.save_checkpoint(tmp_path, {"iteration": it, "w": torch.full((3,), float(it))}, keep=2)
    assert [p.name for p in store.checkpoint_paths(tmp_path)] == ["checkpoint-000002.safetensors",
                                                                  "checkpoint-000001.safetensors"]
    newest, older = store.checkpoint_paths(tmp_path)
    newest.write_bytes(newest.read_bytes()[:-10])
    lines: list[str] = []
    ckpt = store.load_checkpoint(tmp_path, echo=lines.append)
    assert ckpt["iteration"] == 1 and torch.equal(ckpt["w"], torch.ones(3))
    assert ckpt["metrics_rows"] == [{"iteration": 0, "loss": 0.0}, {"iteration": 1, "loss": 0.5}]
    assert len(lines) == 1 and str(newest) in lines[0] and "resuming from 'checkpoint-000001" in lines[0]
    assert (tmp_path / (newest.name + store.CORRUPT_SUFFIX)).exists()
    older.write_bytes(b"\0" * 64)
    lines.clear()
    assert store.load_checkpoint(tmp_path, echo=lines.append) is None
    assert len(lines) == 1 and str(older) in lines[0] and "from scratch" in lines[0]


def test_truncated_metrics_of_unfinished_cell_loses_no_row(tmp_path: Path, digits_cache: Path,
                                                          finished_grid: Path) -> None:
    """The issue's case: metrics.jsonl cut to iterations [0, 1] (plus a torn line) in a cell killed before "done";
    the rerun used to mark it done with those two rows, its final eval gone."""
    cell = killed_before_done(finished_grid, tmp_path, digits_cache)
    reference = (finished_grid / "smoke" / CELL / store.METRICS_FILE).read_text()
    lines = reference.splitlines(keepends=True)
    (cell / store.METRICS_FILE).write_text("".join(lines[:2]) + lines[2][:17])
    assert rerun(cell, tmp_path / "log") == 0
    assert (cell / store.METRICS_FILE).read_text() == reference  # every row back, from the last checkpoint
    assert status(cell) == "done"


def test_finished_cell_gets_lost_rows_back_from_its_final_checkpoint(tmp_path: Path, digits_cache: Path,
                                                                    finished_grid: Path) -> None:
    res = results_dir(tmp_path, digits_cache)
    shutil.copytree(finished_grid / "smoke", res / "smoke", symlinks=True)
    cell = res / "smoke" / CELL
    reference = (cell / store.METRICS_FILE).read_text()
    (cell / store.METRICS_FILE).write_text(reference[: reference.index("\n") + 30])  # row 0 and a torn piece
    log = tmp_path / "log"
    assert rerun(cell, log) == 0
    warnings = [line for line in log.read_text().splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: '{cell / store.METRICS_FILE}' had lost 3 of its 4 rows; restored them from "
                        "'checkpoint-000003.safetensors'"], log.read_text()
    assert (cell / store.METRICS_FILE).read_text() == reference
    assert len(store.read_jsonl(cell / store.RUNS_FILE)) == 1, "a finished cell is not run again"


def test_torn_metrics_mid_run_resumes_from_last_consistent_checkpoint(tmp_path: Path, digits_cache: Path,
                                                                     finished_grid: Path) -> None:
    """Killed between the checkpoints of iterations 2 and 3 with metrics.jsonl garbled after row 0: the resume
    restores rows 0-2 from checkpoint 2 and retrains iteration 3, equal to the uninterrupted run."""
    cell = killed_before_done(finished_grid, tmp_path, digits_cache)
    store.checkpoint_paths(cell)[0].unlink()
    text = (cell / store.METRICS_FILE).read_text().splitlines(keepends=True)
    (cell / store.METRICS_FILE).write_text(text[0] + '{"iteration": 1, "nfe": 12\x00\x00\n' + "".join(text[2:]))
    assert rerun(cell, tmp_path / "log") == 0
    assert comparable(metrics(cell)) == comparable(metrics(finished_grid / "smoke" / CELL))
    assert [r["iteration"] for r in metrics(cell)] == [0, 1, 2, 3]


def test_corrupt_checkpoint_is_named_and_the_previous_one_resumed(tmp_path: Path, digits_cache: Path,
                                                                 finished_grid: Path) -> None:
    cell = killed_before_done(finished_grid, tmp_path, digits_cache)
    newest = store.checkpoint_paths(cell)[0]
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    log = tmp_path / "log"
    assert rerun(cell, log) == 0
    warnings = [line for line in log.read_text().splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and str(newest) in warnings[0] and "checkpoint-000002" in warnings[0], warnings
    assert "Traceback" not in log.read_text()
    assert comparable(metrics(cell)) == comparable(metrics(finished_grid / "smoke" / CELL))
    assert (cell / (newest.name + store.CORRUPT_SUFFIX)).exists() and status(cell) == "done"


def test_corrupt_cache_files_are_named_and_rebuilt(tmp_path: Path, digits_cache: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    from bench.runner.components import build_world
    from bench.runner.config import compose_config

    cache = tmp_path / "results" / "cache"
    shutil.copytree(digits_cache, cache)
    model_file, judges_file = sorted(cache.glob("digits_base_*.pt"))[0], sorted(cache.glob("digits_judges_*.pt"))[0]
    good_model = torch.load(model_file, weights_only=True)
    good_judges = pickle.loads(judges_file.read_bytes())
    model_file.write_bytes(model_file.read_bytes()[:1000])  # torn
    judges_file.write_bytes(b"\x80\x04garbage")
    world = build_world(compose_config(["grid=smoke", f"results_dir={tmp_path / 'results'}"]))
    policy = world.build_policy()
    x = world.real_x[:50].numpy().astype(np.float64)
    scores = [world.judges[0].predict_proba(x), world.judges[1].decision_function(x)]
    err = capsys.readouterr().err.splitlines()
    named = [line for line in err if "cache file" in line]
    assert len(named) == 2 and str(model_file) in named[0] and str(judges_file) in named[1], err
    # Rebuilt to the same deterministic objects, and written back: the next load is silent.
    assert all(torch.equal(good_model[k], v) for k, v in policy.state_dict().items())
    assert np.array_equal(scores[0], good_judges[0].predict_proba(x))
    assert np.array_equal(scores[1], good_judges[1].decision_function(x))
    assert torch.load(model_file, weights_only=True).keys() == good_model.keys()
    build_world(compose_config(["grid=smoke", f"results_dir={tmp_path / 'results'}"])).judges  # noqa: B018
    assert "cache file" not in capsys.readouterr().err


def test_disk_full_names_the_path_exits_3_and_cells_resume(tmp_path: Path, digits_cache: Path,
                                                          finished_grid: Path) -> None:
    """From the third metrics row on every write fails with ENOSPC (tests/runner_helpers.py, fault disk_full): one
    line naming the file, exit code 3, no cell marked failed; after space is freed the same command finishes the
    cell, equal to the uninterrupted run."""
    res = results_dir(tmp_path, digits_cache)
    args, log = [*ONE_CELL, f"results_dir={res}"], tmp_path / "log"
    assert run_runner(args, fault=("disk_full", 3), log=log) == 3
    out = log.read_text()
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    cell = res / "smoke" / CELL
    assert errors == [f"error: disk full writing '{cell / store.METRICS_FILE}' (No space left on device); free "
                      "space and rerun the same command to resume"], out
    assert "Traceback" not in out and "died" not in out
    assert status(cell) in ("running", "interrupted") and not (cell / store.LOCK_FILE).exists()
    assert [r["iteration"] for r in metrics(cell)] == [0, 1]
    assert run_runner(args, log=log) == 0
    assert comparable(metrics(cell)) == comparable(metrics(finished_grid / "smoke" / CELL))
    assert status(cell) == "done"
    runs = store.read_jsonl(cell / store.RUNS_FILE)
    assert len(runs) == 2 and runs[1]["resume"]
    assert json.loads((cell / store.STATUS_FILE).read_text()).get("error") is None


MOUNT_FAILED = 99


@pytest.mark.slow
def test_disk_full_on_a_real_tmpfs(tmp_path: Path, digits_cache: Path, finished_grid: Path) -> None:
    """The same on a real full filesystem: a 3 MB tmpfs (in a private mount namespace: `unshare -rm`, no root
    needed where user namespaces are allowed) holds the first checkpoint but not the second; it is then grown
    to 64 MB and the same command finishes the cell."""
    if shutil.which("unshare") is None or shutil.which("bash") is None:
        pytest.skip("needs util-linux unshare and bash")
    mnt, out = tmp_path / "mnt", tmp_path / "out"
    mnt.mkdir()
    run = (f"HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 {shlex.quote(sys.executable)} -m bench.run "
           + " ".join(shlex.quote(a) for a in [*ONE_CELL, f"results_dir={mnt}"]))
    script = "\n".join([
        f"mount -t tmpfs -o size=3m tmpfs {mnt} || exit {MOUNT_FAILED}",
        f"ln -s {digits_cache} {mnt}/cache",
        f"{run} > {out}.1 2>&1; echo $? > {out}.rc1",
        f"mount -o remount,size=64m {mnt}",
        f"{run} > {out}.2 2>&1; echo $? > {out}.rc2",
        f"cp -r {mnt}/smoke {out}"])
    proc = subprocess.run(["unshare", "-rm", "bash", "-c", script], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    if proc.returncode == MOUNT_FAILED or "unshare failed" in proc.stderr:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()[:200]}")
    first = Path(f"{out}.1").read_text()
    errors = [line for line in first.splitlines() if line.startswith("error:")]
    assert Path(f"{out}.rc1").read_text().strip() == "3", first
    assert len(errors) == 1 and "disk full writing" in errors[0] and str(mnt) in errors[0], first
    assert "Traceback" not in first
    assert Path(f"{out}.rc2").read_text().strip() == "0", Path(f"{out}.2").read_text()
    assert comparable(metrics(out / CELL)) == comparable(metrics(finished_grid / "smoke" / CELL))
    runs = store.read_jsonl(out / CELL / store.RUNS_FILE)
    assert len(runs) == 2 and runs[1]["resume"]
