"""LoRA training on the tiny sd3 world: ratios before the first update, what an optimizer step changes, a full cell."""
from __future__ import annotations

import json

import pytest
import torch

from bench.runner import store
from bench.core.errors import UserError
from bench.core.meter import ComputeMeter
from bench.core.policy import PolicyCall
from bench.worlds.sd3 import SD3World
from bench.worlds.sd3_tiny import tiny_world_config
from estimators.elbo import ELBOEstimator
from estimators.stepwise import StepwiseEstimator
from samplers.flow_sde import FlowSDESampler

PROMPTS = ["a photo of a cat", "a photo of a dog"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return SD3World(tiny_world_config(), tmp_path_factory.mktemp("cache"))


def _rollout(world, policy, guidance, seed=0):
    meter = ComputeMeter()
    model = PolicyCall(policy, meter, guidance=guidance)
    sampler = FlowSDESampler({"steps": 3, "shift": 3.0, "guidance": guidance, "noise_level": 0.7})
    gen = torch.Generator().manual_seed(seed)
    with meter.phase("rollout"), torch.no_grad():
        rollout = sampler.sample(model, PROMPTS, world.encode(PROMPTS), 2, world.latent_shape, gen)
    return model, meter, rollout, gen


def test_trainable_parameters_are_lora_only(world):
    policy = world.build_policy()
    params = policy.trainable_named_parameters()
    assert params and all(".lora_A." in n or ".lora_B." in n for n in params)
    # r=4 adapters on to_q/to_k/to_v/to_out.0 of the 2 joint blocks' attn plus block 0's dual attention (attn2).
    targets = [n for n, _ in policy.transformer.named_modules() if n.endswith(("to_q", "to_k", "to_v", "to_out.0"))
               and "lora" not in n and "base_layer" not in n]
    assert len(params) == 2 * len(targets) == 2 * 4 * 3
    frozen = [n for n, p in policy.named_parameters() if p.requires_grad and n not in params]
    assert frozen == []
    assert all(not p.requires_grad for p in world.comps["vae"].parameters())
    assert not world.comps["text_encoder"].training and not world.comps["vae"].training


def test_snapshot_at_start_is_the_adapters_disabled_reference(world):
    policy = world.build_policy()
    ref = policy.snapshot()
    meter = ComputeMeter()
    x = torch.randn(2, *world.latent_shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.9, 0.3])
    cond = world.encode(PROMPTS)
    with torch.no_grad(), meter.phase("eval"):
        with policy.adapters_disabled():
            v_base = policy.velocity(x, t, cond)
        v_snap = PolicyCall(policy, meter, params=ref)(x, t, cond)
        # Move the live LoRA away from B = 0: the snapshot (functional_call, strict=False) still gives the base model.
        for n, p in policy.trainable_named_parameters().items():
            if "lora_B" in n:
                p.add_(0.1)
        v_moved = PolicyCall(policy, meter)(x, t, cond)
        v_snap_after = PolicyCall(policy, meter, params=ref)(x, t, cond)
    assert torch.equal(v_snap, v_base)
    assert torch.equal(v_snap_after, v_base)
    assert (v_moved - v_base).abs().max() > 1e-3


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_ratios_are_one_before_the_first_update(world, guidance):
    policy = world.build_policy()
    model, meter, rollout, gen = _rollout(world, policy, guidance)
    old = policy.snapshot()
    for est in (StepwiseEstimator({"name": "stepwise"}), ELBOEstimator({"name": "elbo", "J": 2})):
        units = est.units(rollout)
        draws = est.prepare(rollout, units, gen)
        with meter.phase("train"):
            cur = est.estimate(model, rollout, units, draws).logp
            recomputed = est.old_logp(model.with_params(old), rollout, units, draws, gen, is_sampling_policy=False)
            stored = est.old_logp(model.with_params(old), rollout, units, draws, gen, is_sampling_policy=True)
        assert cur.requires_grad and len(cur) == len(units) > 0
        ratio = torch.exp(cur.detach() - recomputed)
        if guidance == 1.0:
            # Same batch, same weights (functional_call over the LoRA snapshot): bit-identical.
            assert torch.equal(ratio, torch.ones_like(ratio)), type(est).__name__
        else:
            # With CFG the grad pass runs cond/uncond as two batches, the no-grad pass as one: float32 rounding only.
            assert (ratio - 1).abs().max() < 1e-5, type(est).__name__
        # Against the log-probs recorded while sampling (stepwise) / recomputed (ELBO).
        assert (torch.exp(cur.detach() - stored) - 1).abs().max() < 1e-4, type(est).__name__


def test_one_optimizer_step_changes_only_lora(world):
    policy = world.build_policy()
    model, meter, rollout, gen = _rollout(world, policy, 1.0)
    params = policy.trainable_named_parameters()
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    frozen_before = {n: p.detach().clone() for n, p in world.comps["text_encoder_3"].named_parameters()}
    opt = torch.optim.AdamW(params.values(), lr=1e-3, weight_decay=0.0)
    est = ELBOEstimator({"name": "elbo", "J": 2})
    units = est.units(rollout)
    draws = est.prepare(rollout, units, gen)
    with meter.phase("train"):
        logp = est.estimate(model, rollout, units, draws).logp
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    loss = -(adv * logp).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    changed = {n for n, p in policy.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and changed <= set(params)
    assert any("lora_B" in n for n in changed)  # B leaves zero: the policy moved
    assert all(torch.equal(p, frozen_before[n]) for n, p in world.comps["text_encoder_3"].named_parameters())
    meter_train = meter.current.train_backwards
    assert meter_train == len(units) * 2  # J = 2 noisings per unit, each with a backward


def test_eval_is_deterministic_and_writes_a_grid(world, tmp_path):
    policy = world.build_policy()
    meter = ComputeMeter()
    with meter.phase("eval"):
        a = world.evaluate(PolicyCall(policy, meter), tmp_path, "0000")
        b = world.evaluate(PolicyCall(policy, meter), None, "0001")
    assert a == b and set(a) == {"eval_reward"}
    assert (tmp_path / "eval_0000.png").stat().st_size > 0
    assert a["eval_reward"] < 0  # jpeg: minus kilobytes


def test_missing_model_path_gives_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for path in (str(tmp_path / "nowhere"), "someone/not-a-cached-model"):
        w = SD3World(tiny_world_config(variant="full", model_path=path), tmp_path)
        with pytest.raises(UserError, match=r"world.model_path=.*HF_HUB_OFFLINE=1.*stable-diffusion-3.5-medium"):
            w.build_policy()
    with pytest.raises(UserError, match="world.variant=huge: unknown value; valid: full, tiny"):
        SD3World(tiny_world_config(variant="huge"), tmp_path)


def test_run_stops_before_any_cell_without_weights(tmp_path, monkeypatch, capsys):
    from bench.run import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "results"
    assert main(["grid=sd3_smoke", "world.variant=full", f"world.model_path={tmp_path / 'sd35'}",
                 f"results_dir={out}"]) == 2
    assert f"world.model_path='{tmp_path / 'sd35'}'" in capsys.readouterr().err
    assert not out.exists()


def test_train_cell_on_tiny_sd3(tmp_path):
    from bench.runner.config import compose_config
    from bench.training.train import train_cell

    cfg = compose_config(["grid=sd3_smoke", f"results_dir={tmp_path}", "sampler=flow_sde", "estimator=stepwise",
                          "budget.iterations=1", "eval.every=1", "world.reward=jpeg", "train.minibatches=1"])
    train_cell(cfg, tmp_path / "cell")
    rows = [json.loads(line) for line in (tmp_path / "cell" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1]
    assert rows[1]["rollout_forwards"] == 2 * 4 * 4 * 2  # prompts x group x steps x CFG branches
    assert "eval_reward" in rows[1] and rows[1]["grad_norm"] > 0
    # One optimizer step per batch (rollouts with CFG 1.5): the ratio the objective saw is exactly 1.
    assert rows[1]["ratio_min"] == rows[1]["ratio_max"] == 1.0
    ckpt = store.load_checkpoint(tmp_path / "cell")
    assert ckpt["params"] and all("lora_" in n for n in ckpt["params"])
    assert (tmp_path / "cell" / "samples" / "eval_0001.png").exists()


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path):
    grads = []
    for ckpt in (False, True):
        w = SD3World(tiny_world_config(gradient_checkpointing=ckpt), tmp_path)
        policy = w.build_policy()
        with torch.no_grad():
            for n, p in policy.trainable_named_parameters().items():
                if "lora_B" in n:
                    p.fill_(0.01)
        x = torch.randn(2, *w.latent_shape, generator=torch.Generator().manual_seed(0))
        policy.velocity(x, torch.tensor([0.7, 0.2]), w.encode(PROMPTS)).pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in policy.trainable_named_parameters().items()})
    assert policy.transformer.gradient_checkpointing
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7)


def test_bf16_transformer_keeps_fp32_lora_and_outputs(world):
    from bench.worlds.sd3_policy import SD3Policy, add_lora
    from bench.worlds.sd3_tiny import build_tiny_transformer

    cond = world.encode(PROMPTS)
    x = torch.randn(2, *world.latent_shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.9, 0.2])
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        tr = build_tiny_transformer(0)
        tr = tr if dtype == torch.float32 else tr.to(dtype)
        add_lora(tr, r=4, alpha=8, seed=0)
        policy = SD3Policy(tr, world.encode([""]))
        assert all(p.dtype == torch.float32 for p in policy.trainable_named_parameters().values())
        with torch.no_grad():
            out[dtype] = policy.velocity(x, t, cond)
    assert out[torch.bfloat16].dtype == torch.float32
    # bf16 rounding only (8 mantissa bits): a few percent of the velocity's scale, not a different model.
    assert (out[torch.bfloat16] - out[torch.float32]).abs().max() < 0.05 * out[torch.float32].abs().mean() + 0.02
