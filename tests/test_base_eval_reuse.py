"""The grid's base-model eval is every matching cell's iteration 0 (issue 13 item 3): the key is the world identity
(the methods and the seed do not change it; the world's eval protocol does), reuse needs an eval that leaves the
global generators untouched, and a reused iteration 0 gives the cell the same rows as evaluating it itself."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.runner import base_eval, execute, store
from bench.runner.grid import BASE_CELL, expand_grid, mark_invalid
from bench.worlds.sd3 import SD3World

TIMING = ("iter_wall_s", "wall_s", "device_s", "device_hours", "peak_mem_mb", "rollout_s", "reward_s", "train_s")


def _cells(overrides: list[str] | None = None):
    _, cells = expand_grid("sd3_smoke", overrides or [])
    mark_invalid(cells)
    return [c for c in cells if c.skip_reason is None]


def test_key_is_the_world_identity() -> None:
    cells = _cells()
    assert len({c.hash for c in cells}) == len(cells) > 1  # different cells ...
    assert len({base_eval.base_eval_key(c.cfg) for c in cells}) == 1  # ... one base eval
    other = _cells(["world.eval.steps=5"])[0]
    assert base_eval.base_eval_key(other.cfg) != base_eval.base_eval_key(cells[0].cfg)
    assert base_eval.base_eval_key(_cells(["seed=7"])[0].cfg) == base_eval.base_eval_key(cells[0].cfg)


@pytest.mark.parametrize("draw, neutral", [(lambda: torch.rand(1), False), (lambda: np.random.rand(), False),
                                           (lambda: random.random(), False), (lambda: torch.zeros(1), True)])
def test_neutrality_sees_every_global_generator(draw, neutral: bool) -> None:
    with base_eval.neutrality() as rng:
        draw()
    assert rng["neutral"] is neutral


def test_reuse_needs_matching_key_and_neutral_eval(tmp_path: Path) -> None:
    cfg = _cells()[0].cfg
    metrics = tmp_path / "metrics.json"
    assert base_eval.reusable_base_eval(cfg, tmp_path, metrics) is None  # nothing yet
    metrics.write_text(json.dumps({"eval_reward": 1.5}))
    (tmp_path / "eval_base.png").write_bytes(b"png")
    base_eval.write_key(tmp_path, cfg, neutral=False)
    assert base_eval.reusable_base_eval(cfg, tmp_path, metrics) is None  # the eval draws from a global generator
    base_eval.write_key(tmp_path, cfg, neutral=True)
    got = base_eval.reusable_base_eval(cfg, tmp_path, metrics)
    assert got == {"metrics": {"eval_reward": 1.5}, "samples": [str(tmp_path / "eval_base.png")]}
    assert base_eval.reusable_base_eval(_cells(["world.eval.steps=5"])[0].cfg, tmp_path, metrics) is None


@pytest.mark.slow  # two one-iteration tiny sd3 cells (CI runs it: python -m pytest -m slow)
def test_reused_iteration_zero_gives_the_same_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cell = _cells(["budget.iterations=1", "eval.every=1", f"results_dir={tmp_path}"])[0]
    calls = []
    evaluate = SD3World.evaluate
    monkeypatch.setattr(SD3World, "evaluate", lambda self, *a: calls.append(a[-1]) or evaluate(self, *a))
    rows = {}
    for name, reuse in (("reused", True), ("own", False)):
        grid_dir = tmp_path / name
        grid_dir.mkdir()
        assert execute.run_base(cell, grid_dir) == "done"
        if not reuse:
            base_eval.write_key(grid_dir / BASE_CELL, cell.cfg, neutral=False)
        assert execute.run_cell(cell, grid_dir) == "done"
        rows[name] = [{k: v for k, v in r.items() if k not in TIMING and not k.endswith("_s")}
                      for r in store.read_metrics(grid_dir / cell.name)]
        assert (grid_dir / cell.name / "samples" / "eval_0000.png").exists()
    assert calls == ["base", "0001", "base", "0000", "0001"]  # the reusing cell never evaluated iteration 0
    assert rows["reused"] == rows["own"]
    base = json.loads((tmp_path / "own" / BASE_CELL / "metrics.json").read_text())
    assert {k: rows["own"][0][k] for k in base} == base
