"""The GPU grids for SD3.5 compose with the papers' settings, and the CPU smoke grid selects the tiny sd3 world."""
from __future__ import annotations

from bench.runner.grid import expand_grid, mark_invalid


def _valid(grid: str, overrides: list[str] | None = None):
    base, cells = expand_grid(grid, overrides or [])
    mark_invalid(cells)
    return base, [c for c in cells if c.skip_reason is None]


def test_geneval_grid_settings():
    base, cells = _valid("sd35_geneval_elbo_vs_stepwise")
    assert sorted(c.method for c in cells) == sorted(
        ["stepwise-flow_sde-grpo_clip", "stepwise-flow_sde-epg", "elbo-flow_sde-grpo_clip", "elbo-flow_sde-epg",
         "elbo-ode-grpo_clip", "elbo-ode-epg"])
    for c in cells:
        cfg = c.cfg
        assert (cfg.world.name, cfg.world.variant, cfg.world.resolution) == ("sd3", "full", 512)
        assert (cfg.sampler.steps, cfg.sampler.guidance, cfg.world.shift) == (10, 1.0, 3.0)
        assert (cfg.train.group_size, cfg.train.lr, cfg.world.lora.r, cfg.world.lora.alpha) == (24, 3e-4, 32, 64)
        assert cfg.budget.device_hours == 96 and cfg.world.reward == "geneval"
    assert base.grid.baseline == {"estimator": "stepwise", "sampler": "flow_sde", "objective": "grpo_clip"}


def test_hps_grid_settings(monkeypatch):
    monkeypatch.setenv("DIFFRL_MODELS", "/data/models")
    _, cells = _valid("sd35_hps_tree_vs_trajectory")
    assert [c.cfg.sampler.name for c in cells] == ["tree", "flow_sde", "dance", "mix"]
    tree = cells[0].cfg
    assert (tree.sampler.branches, tree.sampler.depth, tree.sampler.steps) == (3, 3, 10)
    for c in cells:
        assert c.cfg.advantage.name == "tree" and c.cfg.estimator.name == "stepwise"
        assert c.cfg.world.reward_options.hpsv2.checkpoint_path == "/data/models/HPS_v2.1_compressed.pt"
        assert c.cfg.budget.device_hours == 64 and c.cfg.train.group_size == 24


def test_smoke_grid_is_the_tiny_sd3_world():
    _, cells = _valid("sd3_smoke")
    assert len(cells) == 3
    assert all(c.cfg.world.name == "sd3" and c.cfg.world.variant == "tiny" for c in cells)
