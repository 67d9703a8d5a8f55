"""summary.parquet covers every cell of the grid folder (issue 9): a restricted rerun keeps the other cells,
unfinished and pending cells are marked as such, folders no manifest lists are found, and cells of one method
that ran different configs are never pooled."""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from bench.runner import store
from bench.runner.grid import Cell
from bench.reporting.summary import build_summary, cell_state, read_manifest, write_manifest


def cell(name: str, est: str, seed: int = 0) -> Cell:
    return Cell(name, name.rsplit("-seed", 1)[0], seed, {"estimator": est}, [], None, None, {"estimator": est})


def finished(grid: Path, name: str, lr: float = 3e-4, status: str = "done", rows: int = 2) -> None:
    d = grid / name
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump({"seed": 0, "train": {"lr": lr}, "estimator": {"name": "elbo"},
                                                   "results_dir": str(grid.parent)}))
    for i in range(rows):
        store.append_metrics(d, {"iteration": i, "nfe": 100 * i, "device_hours": 0.0, "wall_s": 0.0,
                                 "eval_reward": 0.3 + 0.1 * i, "eval_accuracy": 0.3 + 0.1 * i})
    store.write_status(d, status)


def test_cell_states() -> None:
    assert cell_state({"status": "done"}, 9) == ("finished", "finished")
    assert cell_state({"status": "failed", "error": "NonFiniteLoss: non-finite loss (nan) at iteration 7"}, 6)[0] == "diverged"
    assert cell_state({"status": "failed", "error": "RuntimeError: boom"}, 3) == ("failed", "failed: RuntimeError: boom")
    assert cell_state({"status": "running"}, 4) == ("unfinished", "unfinished at iteration 4")
    assert cell_state({"status": "interrupted"}, None) == ("unfinished", "unfinished at iteration 0")
    assert cell_state({"status": "pending"}, None) == ("pending", "not started")


def test_restricted_rerun_keeps_every_cell(tmp_path: Path) -> None:
    grid = tmp_path / "g"
    grid.mkdir()
    everything = [cell("a-seed0", "a"), cell("b-seed0", "b"), cell("c-seed0", "c")]
    write_manifest(grid, everything)
    for c in everything[:2]:
        finished(grid, c.name)
    # A rerun naming one axis value lists only its own cell: the manifest keeps the others.
    write_manifest(grid, everything[:1])
    assert [c.name for c in read_manifest(grid)] == ["a-seed0", "b-seed0", "c-seed0"]
    df = build_summary("g", grid, everything[:1], None)
    states = df.drop_duplicates("cell").set_index("cell").state.to_dict()
    assert states == {"a-seed0": "finished", "b-seed0": "finished", "c-seed0": "pending"}
    # A folder written by another runner, in no manifest, is found too.
    finished(grid, "d-seed0", status="running", rows=3)
    df = build_summary("g", grid, [], None)
    row = df[df.cell == "d-seed0"].iloc[-1]
    assert (row.method, row.state_text) == ("d", "unfinished at iteration 2")


def test_cells_with_different_configs_are_not_pooled(tmp_path: Path) -> None:
    grid = tmp_path / "g"
    grid.mkdir()
    cells = [cell("a-seed0", "a"), Cell("a-seed0-x1", "a", 1, {"estimator": "a"}, [], None, None, {})]
    write_manifest(grid, cells)
    finished(grid, "a-seed0", lr=3e-4)
    finished(grid, "a-seed0-x1", lr=1e-2)
    methods = set(build_summary("g", grid, [], None).method)
    assert methods == {"a [train.lr=0.0003]", "a [train.lr=0.01]"}  # results_dir differs in no cell: not a key


def test_identity_json_decides_what_a_cell_is(tmp_path: Path) -> None:
    grid = tmp_path / "g"
    grid.mkdir()
    cells = [Cell(f"a-seed{s}", "a", s, {"estimator": "a"}, [], None, None, {}) for s in (0, 1)]
    write_manifest(grid, cells)
    for c, threads in zip(cells, (1, 4)):
        finished(grid, c.name)
        # Same semantic config apart from the seed; config.yaml differs in a key the runner calls non-semantic.
        (grid / c.name / "identity.json").write_text(json.dumps({"hash": "x", "identity": {"seed": c.seed, "train": {"lr": 3e-4}}}))
        cfg = yaml.safe_load((grid / c.name / "config.yaml").read_text())
        (grid / c.name / "config.yaml").write_text(yaml.safe_dump({**cfg, "threads": threads}))
    assert set(build_summary("g", grid, [], None).method) == {"a"}
