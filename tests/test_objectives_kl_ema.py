"""KL to the reference (zero there, positive elsewhere, Gaussian closed form) and the EMA old policy's schedule."""
from __future__ import annotations

import pytest
import torch

from bench.training.ema import ema_decay, ema_update
from bench.core.policy import PolicyCall
from estimators import ESTIMATORS
from objectives.kl import kl_penalty
from runner_helpers import digits_cache, results_dir  # noqa: F401 (session fixture: one digits cache)
from samplers import SAMPLERS


def _perturbed(policy, scale=0.05):
    torch.manual_seed(3)
    return {k: v + scale * torch.randn_like(v) for k, v in policy.snapshot().items()}


@pytest.mark.parametrize("sampler,estimator,kind", [("flow_sde", "stepwise", "transition"),
                                                     ("cps_sde", "stepwise", "transition"),
                                                     ("flow_sde", "stepwise", "velocity"),
                                                     ("ode", "elbo", "velocity")])
def test_kl_zero_at_reference_positive_elsewhere(tiny_policy, meter, sampler, estimator, kind):
    model = PolicyCall(tiny_policy, meter)
    with meter.phase("rollout"), torch.no_grad():
        r = SAMPLERS.get(sampler)({"steps": 4}).sample(model, ["a", "b"], torch.tensor([1, 7]), 3, (64,),
                                                       torch.Generator().manual_seed(0))
    est_obj = ESTIMATORS.get(estimator)({"J": 2} if estimator == "elbo" else {})
    units = est_obj.units(r)
    draws = est_obj.prepare(r, units, torch.Generator().manual_seed(1))
    with meter.phase("train"):
        est = est_obj.estimate(model, r, units, draws)
        at_ref = kl_penalty(kind, est, model.with_params(tiny_policy.snapshot()), r, units)
        away = kl_penalty(kind, est, model.with_params(_perturbed(tiny_policy)), r, units)
    assert at_ref.item() == 0.0
    assert away.item() > 1e-6
    away.backward()  # differentiable in theta


def test_transition_kl_is_the_gaussian_kl_of_the_means(tiny_policy, meter):
    model = PolicyCall(tiny_policy, meter)
    with meter.phase("rollout"), torch.no_grad():
        r = SAMPLERS.get("flow_sde")({"steps": 3}).sample(model, ["a"], torch.tensor([2]), 2, (64,),
                                                          torch.Generator().manual_seed(0))
    est_obj = ESTIMATORS.get("stepwise")({})
    units = est_obj.units(r)
    ref = _perturbed(tiny_policy)
    with meter.phase("train"), torch.no_grad():
        est = est_obj.estimate(model, r, units, {})
        kl = kl_penalty("transition", est, model.with_params(ref), r, units)
        parents = r.parent[units]
        v_ref = model.with_params(ref)(r.x[parents], r.t[parents], r.node_cond(parents))
    s = r.scale[units][:, None]
    mu, _ = r.kernel.mean_scale(r.x[parents], est.v, r.t[parents], r.t[units], r.schedule)
    mu_ref, _ = r.kernel.mean_scale(r.x[parents], v_ref, r.t[parents], r.t[units], r.schedule)
    closed = torch.distributions.kl_divergence(torch.distributions.Normal(mu, s), torch.distributions.Normal(mu_ref, s))
    torch.testing.assert_close(kl, closed.mean(), rtol=1e-5, atol=1e-9)


def test_transition_kl_refuses_final_sample_units(tiny_policy, meter):
    from bench.core.errors import UserError

    model = PolicyCall(tiny_policy, meter)
    with meter.phase("rollout"), torch.no_grad():
        r = SAMPLERS.get("ode")({"steps": 3}).sample(model, ["a"], torch.tensor([2]), 2, (64,),
                                                     torch.Generator().manual_seed(0))
    est_obj = ESTIMATORS.get("elbo")({"J": 1})
    units = est_obj.units(r)
    with meter.phase("train"), pytest.raises(UserError, match="kl_type=transition needs SDE edges"):
        est = est_obj.estimate(model, r, units, est_obj.prepare(r, units, torch.Generator().manual_seed(0)))
        kl_penalty("transition", est, model, r, units)


def test_ema_decay_follows_the_diffusionnft_ramp():
    cfg = {"ema_decay": 0.5, "ema_ramp": {"rate": 0.1, "flat": 2}}
    got = [ema_decay(cfg, i) for i in range(1, 11)]
    # 0 up to the flat steps, then rate * (i - flat), capped at ema_decay.
    assert got == pytest.approx([0.0, 0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.5, 0.5, 0.5])
    assert ema_decay({"ema_decay": 0.9}, 7) == 0.9  # no ramp: fixed decay


def test_ema_update_closed_form():
    ema = {"w": torch.tensor([1.0, 0.0])}
    cfg = {"ema_decay": 0.5, "ema_ramp": {"rate": 0.25, "flat": 0}}
    seq = [torch.tensor([3.0, 1.0]), torch.tensor([5.0, -1.0]), torch.tensor([0.0, 2.0])]
    for i, p in enumerate(seq, start=1):
        ema_update(ema, {"w": p}, ema_decay(cfg, i))
    # decays 0.25, 0.5, 0.5: e1 = .25*[1,0] + .75*[3,1] = [2.5, .75]; e2 = [3.75, -.125]; e3 = [1.875, .9375]
    torch.testing.assert_close(ema["w"], torch.tensor([1.875, 0.9375]))


def test_training_loop_applies_the_scheduled_decay(tmp_path, digits_cache):
    from bench.runner.components import build_world
    from bench.runner.config import compose_config
    from bench.runner.store import load_checkpoint
    from bench.training.train import train_cell

    res = results_dir(tmp_path, digits_cache)
    cfg = compose_config(["estimator=elbo", "sampler=ode", "objective=nft", f"results_dir={res}",
                          "budget.iterations=1", "train.old_policy=ema", "train.ema_decay=0.9",
                          "train.ema_ramp={rate: 0.3, flat: 0}", "train.prompts_per_iter=2", "train.group_size=4",
                          "world.eval.samples_per_class=2"])
    train_cell(cfg, tmp_path / "cell")
    ckpt = load_checkpoint(tmp_path / "cell")
    base = build_world(cfg).build_policy().snapshot()
    for name, p in ckpt["params"].items():
        # After iteration 1 the ramp gives decay 0.3: ema = 0.3 * base + 0.7 * theta_1.
        torch.testing.assert_close(ckpt["ema"][name], 0.3 * base[name] + 0.7 * p)
