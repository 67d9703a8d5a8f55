"""LoRA export: the adapter in diffusers' format, loaded by StableDiffusion3Pipeline.load_lora_weights into a fresh
tiny pipeline, gives the trained policy's velocity; cells export at eval points and can start from an export."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from safetensors import safe_open

from bench import run
from bench.core.errors import UserError
from bench.runner import store
from bench.runner.config import compose_config
from bench.training.train import build_state, train_cell
from bench.worlds.sd3 import SD3World
from bench.worlds.sd3_lora_export import export_lora, init_from_lora
from bench.worlds.sd3_tiny import build_tiny_components, tiny_world_config

PROMPTS = ["a photo of a cat", "a red car"]
REPO = Path(__file__).resolve().parents[1]
CELL = ["grid=sd3_smoke", "sampler=flow_sde", "estimator=stepwise", "world.reward=jpeg"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return SD3World(tiny_world_config(), tmp_path_factory.mktemp("cache"))


def _trained_policy(world, seed=0):
    """A policy whose LoRA is far from its start (B != 0), as after training."""
    policy = world.build_policy()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.trainable_named_parameters().values():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return policy


def _inputs(world):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(2, *world.latent_shape, generator=gen), torch.tensor([0.8, 0.3]), world.encode(PROMPTS)


def test_load_lora_weights_reproduces_the_policy(world, tmp_path):
    policy = _trained_policy(world)
    path = export_lora(policy, tmp_path / "lora.safetensors")
    with safe_open(str(path), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert keys and all(k.startswith("transformer.") and ".default." not in k for k in keys)
    config = json.loads(meta["lora_adapter_metadata"])
    assert config["transformer.r"] == 4 and config["transformer.lora_alpha"] == 8  # scaling alpha / r = 2

    pipe = StableDiffusion3Pipeline(**build_tiny_components(0))  # a fresh pipeline from the same tiny config
    pipe.load_lora_weights(str(path))
    x, t, cond = _inputs(world)
    with torch.no_grad():
        want = policy.velocity(x, t, cond)
        got = pipe.transformer(hidden_states=x, timestep=1000 * t, encoder_hidden_states=cond["prompt_embeds"],
                               pooled_projections=cond["pooled_prompt_embeds"], return_dict=False)[0]
        base = world.build_policy().velocity(x, t, cond)
    assert (want - base).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_init_from_an_export_and_refusals(world, tmp_path):
    trained = _trained_policy(world, seed=3)
    path = export_lora(trained, tmp_path / "lora.safetensors")
    fresh = world.build_policy()
    init_from_lora(fresh, path)
    x, t, cond = _inputs(world)
    with torch.no_grad():
        torch.testing.assert_close(fresh.velocity(x, t, cond), trained.velocity(x, t, cond), rtol=0, atol=0)
    other = SD3World(tiny_world_config(lora={"r": 2, "alpha": 8}), tmp_path / "c").build_policy()
    with pytest.raises(UserError, match="world.lora.r=4 world.lora.alpha=8"):
        init_from_lora(other, path)
    with pytest.raises(UserError, match="no such file"):
        init_from_lora(fresh, tmp_path / "missing.safetensors")


def test_cell_exports_at_eval_points_keeps_k_checkpoints_and_restarts_from_an_export(tmp_path):
    cfg = compose_config([*CELL, f"results_dir={tmp_path}", "budget.iterations=3", "eval.every=2", "checkpoint.every=1",
                          "checkpoint.keep=1"])
    cell = tmp_path / "cell"
    train_cell(cfg, cell)
    assert sorted(p.name for p in (cell / "lora").iterdir()) == ["lora-0002.safetensors", "lora-0003.safetensors"]
    assert [p.name for p in store.checkpoint_paths(cell)] == ["checkpoint-000003.safetensors"]
    # The export is the final weights: a new cell initialised from it starts where this one ended, the
    # reference (KL) policy still the base model.
    init = cell / "lora" / "lora-0003.safetensors"
    s = build_state(compose_config([*CELL, f"results_dir={tmp_path}", f"train.init_lora={init}"]))
    final = store.load_checkpoint(cell)["params"]
    for n, p in s.params.items():
        torch.testing.assert_close(p.detach(), final[n], rtol=0, atol=0)
    assert all(not p.any() for n, p in s.ref_params.items() if "lora_B" in n)


def test_no_pickle_loads_remain():
    """Checkpoints, caches and reward weights load without pickle: every torch.load says weights_only=True."""
    out = subprocess.run(["git", "grep", "-n", "torch.load(", "--", "bench", "estimators", "objectives", "samplers"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout.splitlines()
    assert out and [line for line in out if "weights_only=True" not in line] == []


def test_bad_init_lora_or_launch_precision_exits_2_before_writing(tmp_path, monkeypatch, capsys):
    out = tmp_path / "results"
    assert run.main(["grid=smoke", f"results_dir={out}", f"train.init_lora={tmp_path / 'none.safetensors'}"]) == 2
    assert "train.init_lora=" in capsys.readouterr().err and not out.exists()
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    assert run.main(["grid=smoke", f"results_dir={out}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "accelerate launch --mixed_precision fp16" in err[0] and not out.exists()
