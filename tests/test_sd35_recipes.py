"""The SD3.5 recipe grids (issue 13 item 7) compose, validate and dry-run here (they need GPUs to run): each
method's preset at SD3.5 scale, Flow-GRPO's PickScore scaling (/26), and a comment giving GPU-hours per cell and
the 1x8-GPU and Slurm commands."""
from __future__ import annotations

from pathlib import Path

import pytest

from bench.core.errors import UserError
from bench.run import main
from bench.runner.config import CONFIG_DIR, group_options
from bench.runner.components import validate_cell
from bench.runner.grid import expand_grid, mark_invalid

SD35 = [g for g in group_options("grid") if g.startswith("sd35_")]
PRESETS = ["flow_grpo", "dance_grpo", "mix_grpo", "tree_grpo", "elbo_epg", "nft"]


@pytest.mark.parametrize("grid", SD35)
def test_grid_composes_validates_and_documents_its_cost(grid: str, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    text = (CONFIG_DIR / "grid" / f"{grid}.yaml").read_text()
    comment = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    for needle in ("GPU-hours per cell", "accelerate launch --multi_gpu --num_processes 8", "launcher=slurm"):
        assert needle in comment, (grid, needle)
    _, cells = expand_grid(grid, [])
    mark_invalid(cells)
    valid = [c for c in cells if c.skip_reason is None]
    assert valid
    for c in valid:
        validate_cell(c.cfg, check_files=False)  # names and schemas; the weights are not here
        assert (c.cfg.world.variant, c.cfg.world.resolution, c.cfg.train.group_size) == ("full", 512, 24)
        assert c.cfg.train.prompts_per_iter % 8 == 0  # shards over 8 ranks
    assert main([f"grid={grid}", f"results_dir={tmp_path}", "--dry-run"]) == 0
    assert "nothing written" in capsys.readouterr().out and not any(tmp_path.iterdir())


def test_pickscore_grid_runs_each_preset_on_flow_grpos_recipe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIFFRL_MODELS", "/data/models")
    _, cells = expand_grid("sd35_pickscore_methods", [])
    by = {c.cfg.preset: c.cfg for c in cells}
    assert sorted(by) == sorted(PRESETS)
    for cfg in by.values():
        opts = cfg.world.reward_options.pickscore
        assert cfg.world.reward == "pickscore" and opts.scale == 26.0
        assert opts.model_path == "/data/models/PickScore_v1"
        assert (cfg.sampler.steps, cfg.world.eval.steps, cfg.world.eval.guidance) == (10, 40, 4.5)
    # The grid's Flow-GRPO values; each preset's own knobs win over them (config.yaml: method after grid).
    assert by["flow_grpo"].train.kl_coef == 0.01 and by["flow_grpo"].sampler.guidance == 4.5
    assert by["dance_grpo"].train.kl_coef == 0.0 and by["nft"].train.kl_coef == 1e-4
    assert by["elbo_epg"].sampler.guidance == 1.0 and by["tree_grpo"].sampler.name == "tree"


def test_missing_sd35_weights_are_refused_before_anything_runs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("SD35_MODEL_PATH", str(tmp_path / "no_sd35"))
    _, cells = expand_grid("sd35_pickscore_methods", [])
    with pytest.raises(UserError, match="world.model_path="):
        validate_cell(cells[0].cfg)
