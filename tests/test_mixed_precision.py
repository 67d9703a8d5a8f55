"""train.mixed_precision: autocast forwards (bf16, fp16 with a GradScaler) on the tiny sd3 world, on a CPU."""
from __future__ import annotations

import math

import pytest
import torch

from bench.core.errors import UserError
from bench.runner.config import compose_config
from bench.runner.execute import data_parallel_command
from bench.training.precision import ACCELERATE_ENV, AutocastCall, Precision, check_launch
from bench.training.train import build_state, checkpoint_state, resume, train_iteration


def _state(tmp_path, *overrides):
    cfg = compose_config(["grid=sd3_smoke", f"results_dir={tmp_path}", "sampler=flow_sde", "estimator=stepwise",
                          "world.reward=jpeg", "train.minibatches=1", *overrides])
    return build_state(cfg)


def _linear_output_dtypes(policy):
    """Record the dtype of every nn.Linear output of the transformer (its matmuls)."""
    seen, hooks = set(), []
    for mod in policy.transformer.modules():
        if type(mod) is torch.nn.Linear:
            hooks.append(mod.register_forward_hook(lambda m, i, o: seen.add(o.dtype)))
    return seen, hooks


def test_bf16_autocast_runs_with_fp32_log_probs_and_ratio_one(tmp_path):
    s = _state(tmp_path, "train.mixed_precision=bf16")
    assert isinstance(s.model, AutocastCall) and s.precision.scaler is None
    seen, hooks = _linear_output_dtypes(s.policy)
    row = train_iteration(s, 1)
    for h in hooks:
        h.remove()
    assert seen == {torch.bfloat16}  # the transformer's matmuls ran in bf16
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in s.params.values())
    # One step on a fresh batch: the objective saw the ratio of fp32 log-probs of the same forward, exactly 1.
    assert row["ratio_min"] == row["ratio_max"] == 1.0
    assert math.isfinite(row["loss"]) and row["grad_norm"] > 0


def test_bf16_log_probs_are_fp32_and_close_to_the_rollouts(tmp_path):
    """The train forward's log-probs are float32; against the rollout's own (same weights, another batch) they
    differ by bf16 rounding only."""
    s = _state(tmp_path, "train.mixed_precision=bf16")
    gen = torch.Generator().manual_seed(0)
    prompts = s.world.sample_prompts(2, gen)
    s.meter.start_iteration()
    with s.meter.phase("rollout"), torch.no_grad():
        rollout = s.methods.sampler.sample(s.model, prompts, s.world.encode(prompts), 4, s.world.latent_shape, gen)
    units = s.methods.estimator.units(rollout)
    with s.meter.phase("train"):
        est = s.methods.estimator.estimate(s.model, rollout, units[:5], {})
    stored = s.methods.estimator.old_logp(s.model, rollout, units[:5], {}, gen, True)
    assert est.logp.dtype == torch.float32 and est.v.dtype == torch.float32
    gap = (est.logp.detach() - stored).abs().max().item()
    assert gap < 0.05, gap  # per-dimension log-probs (reduce=mean): O(1) values, bf16 differences well below


def test_fp16_uses_a_grad_scaler_kept_in_checkpoints(tmp_path):
    s = _state(tmp_path, "train.mixed_precision=fp16")
    assert s.precision.scaler is not None and s.precision.skips_bad_steps
    row = train_iteration(s, 1)
    assert math.isfinite(row["loss"])
    state = checkpoint_state(s, 1)
    assert state["grad_scaler"]["scale"] == 65536.0  # GradScaler's initial scale; finite grads keep it
    # A step whose gradients overflow is skipped (weights unchanged) and the scale halves; nothing diverges.
    before = {n: p.detach().clone() for n, p in s.params.items()}
    name = next(iter(s.params))
    handle = s.params[name].register_hook(lambda g: g * float("inf"))
    train_iteration(s, 2)
    handle.remove()
    assert all(torch.equal(p, before[n]) for n, p in s.params.items())
    assert s.precision.scaler.get_scale() == 32768.0
    # Resume restores the scaler's state.
    saved = checkpoint_state(s, 2)
    fresh = _state(tmp_path / "b", "train.mixed_precision=fp16")
    resume(fresh, saved)
    assert fresh.precision.scaler.get_scale() == 32768.0


def test_precision_refuses_what_contradicts_it(tmp_path, monkeypatch):
    monkeypatch.setenv(ACCELERATE_ENV, "bf16")
    with pytest.raises(UserError, match="accelerate launch --mixed_precision bf16"):
        check_launch("no")
    check_launch("bf16")
    monkeypatch.delenv(ACCELERATE_ENV)
    with pytest.raises(UserError, match="world.lora.dtype=float32"):
        _state(tmp_path, "train.mixed_precision=bf16", "world.lora.dtype=bfloat16")
    s = _state(tmp_path / "b", "train.mixed_precision=no")
    s.policy.transformer.pos_embed.to(torch.bfloat16)  # frozen weights in bf16 (world.dtype on the full model)
    with pytest.raises(UserError, match="frozen weights are bfloat16"):
        Precision("fp16", "cpu").check(s.policy)
    Precision("bf16", "cpu").check(s.policy)
    # A data-parallel cell launches accelerate with its own setting, never a forced "no".
    cmd = data_parallel_command(2, "bf16")
    assert cmd[cmd.index("--mixed_precision") + 1] == "bf16"
