"""ELBO options (weightings, time sources, time_fraction, trajectory noisings) and the CPS SDE, by hand."""
from __future__ import annotations

import math

import pytest
import torch

from bench.core.errors import UserError
from bench.core.policy import PolicyCall
from estimators import ESTIMATORS
from samplers import SAMPLERS
from samplers.kernels import CPSSDE
from samplers.rollout import ODE, SDE
from test_estimators import check_stepwise_against_torch_normal


def _rollout(policy, meter, sampler="ode", steps=5, group=3):
    with meter.phase("rollout"), torch.no_grad():
        return SAMPLERS.get(sampler)({"steps": steps}).sample(PolicyCall(policy, meter), ["a", "b"],
                                                              torch.tensor([1, 6]), group, (64,),
                                                              torch.Generator().manual_seed(0))


def _elbo(policy, meter, r, **cfg):
    est = ESTIMATORS.get("elbo")({"J": 3, "reduce": "sum", **cfg})
    units = est.units(r)
    draws = est.prepare(r, units, torch.Generator().manual_seed(5))
    with meter.phase("train"), torch.no_grad():
        out = est.estimate(PolicyCall(policy, meter), r, units, draws)
    x0 = r.x[units][:, None]
    t = draws["t"][..., None]
    x_t = (1 - t) * x0 + t * draws["eps"]
    v = policy.velocity(x_t.flatten(0, 1), draws["t"].flatten(), r.node_cond(units).repeat_interleave(3)).view_as(x_t)
    err = ((v - (draws["eps"] - x0)) ** 2).sum(-1)  # [U, J], reduce=sum
    return out.logp, err, draws


def test_weightings_by_hand(tiny_policy, meter):
    r = _rollout(tiny_policy, meter)
    logp, err, d = _elbo(tiny_policy, meter, r, weighting="uniform")
    torch.testing.assert_close(logp, -err.mean(1))
    logp, err, d = _elbo(tiny_policy, meter, r, weighting="t")
    torch.testing.assert_close(logp, -(d["t"] * err).mean(1))
    # exact on uniform times in [0.02, 0.98]: weight max((1 - t) / t, floor) over the density 1 / 0.96.
    logp, err, d = _elbo(tiny_policy, meter, r, weighting="exact", weight_floor=0.3)
    w = ((1 - d["t"]) / d["t"]).clamp_min(0.3) * 0.96
    torch.testing.assert_close(logp, -(w * err).mean(1))


def test_exact_weight_on_the_grid_is_a_riemann_sum(tiny_policy, meter):
    r = _rollout(tiny_policy, meter, steps=5)            # grid 1, .8, .6, .4, .2, 0
    logp, err, d = _elbo(tiny_policy, meter, r, weighting="exact", timesteps="grid", weight_floor=0.0)
    # Five noisy grid times, each standing for a cell of width 0.2: weight (1 - t) / t * 5 * 0.2.
    torch.testing.assert_close(logp, -((1 - d["t"]) / d["t"] * err).mean(1))


def test_logit_normal_inverse_density_integrates_to_the_range():
    est = ESTIMATORS.get("elbo")({"timesteps": "logit_normal", "time_fraction": 0.5})
    t, inv_density, _ = est._draw_times(200_000, torch.linspace(1, 0, 11), torch.Generator().manual_seed(0))
    # E_q[1 / q(t)] = length of the support [0.02, 0.02 + 0.5 * 0.96].
    assert abs(inv_density.double().mean().item() - 0.48) < 0.01
    assert t.min() >= 0.02 and t.max() <= 0.02 + 0.48


def test_time_fraction_drops_the_noisiest_prefix(tiny_policy, meter):
    r = _rollout(tiny_policy, meter, steps=10)
    _, _, d = _elbo(tiny_policy, meter, r, timesteps="grid", time_fraction=0.3)
    assert set(torch.round(d["t"] * 10).long().unique().tolist()) <= {1, 2, 3}  # the 3 least noisy of 10 times
    _, _, d = _elbo(tiny_policy, meter, r, timesteps="uniform", time_fraction=0.25)
    assert d["t"].max() <= 0.02 + 0.25 * 0.96


@pytest.mark.parametrize("sampler", ["ode", "flow_sde"])
def test_trajectory_noisings_are_the_rollouts_own_nodes(tiny_policy, meter, sampler):
    r = _rollout(tiny_policy, meter, sampler=sampler, steps=6)
    est = ESTIMATORS.get("elbo")({"J": 4, "timesteps": "grid", "noising": "trajectory"})
    units = est.units(r)
    d = est.prepare(r, units, torch.Generator().manual_seed(1))
    x_t = (1 - d["t"][..., None]) * r.x[units][:, None] + d["t"][..., None] * d["eps"]
    step = torch.round((1 - d["t"]) * 6).long()          # shift 1: grid time t sits at step 6 (1 - t)
    nodes = r.path_nodes(units).gather(1, step)
    torch.testing.assert_close(x_t, r.x[nodes], rtol=0, atol=1e-6)
    assert (r.t[nodes] == d["t"]).all()
    with pytest.raises(UserError, match="timesteps=grid"):
        ESTIMATORS.get("elbo")({"noising": "trajectory", "timesteps": "uniform"})


def test_cps_kernel_preserves_coefficients():
    # A perfect model of a point mass x0: at x = (1 - s) x0 + s eps it predicts v = eps - x0.
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 64, generator=g), torch.randn(4, 64, generator=g)
    sigma, nxt = torch.full((4,), 0.7), torch.full((4,), 0.5)
    x = (1 - 0.7) * x0 + 0.7 * eps
    mu, std = CPSSDE(0.7).mean_scale(x, eps - x0, sigma, nxt)
    expected_std = 0.5 * math.sin(0.7 * math.pi / 2)
    torch.testing.assert_close(std, torch.full((4,), expected_std))
    # x' = mu + std xi = (1 - t') x0 + sqrt(t'^2 - std^2) eps + std xi: noise variance exactly t'^2.
    torch.testing.assert_close(mu, (1 - 0.5) * x0 + math.sqrt(0.25 - expected_std**2) * eps)


def test_cps_sampler_and_stepwise_estimator(tiny_policy, meter):
    r = _rollout(tiny_policy, meter, sampler="cps_sde", steps=4, group=2)
    last = r.step == 4
    assert (r.kind[last] == ODE).all() and (r.kind[(r.step > 0) & ~last] == SDE).all()
    check_stepwise_against_torch_normal(tiny_policy, meter, r, stored_atol=1e-5)


def test_exact_weighting_recovers_the_log_ratio_of_gaussian_flows(meter):
    # With the exact velocity of two Gaussian data laws the diffusion ELBO is tight, so the exact weighting's
    # ELBO difference is the closed-form log-ratio (up to Monte Carlo noise and the [t_min, t_max] truncation).
    from test_exact import D, LinearFlow

    old, new = LinearFlow(torch.float32), LinearFlow(torch.float32)
    new.s.data = old.s.data * (1 + 0.1 * torch.randn(D, generator=torch.Generator().manual_seed(4)))
    with meter.phase("eval"), torch.no_grad():
        r = SAMPLERS.get("ode")({"steps": 50}).sample(PolicyCall(old, meter), ["a"], torch.tensor([0]), 8, (D,),
                                                      torch.Generator().manual_seed(0))
        truth = (new.log_density(r.x0) - old.log_density(r.x0)).float()
        est = ESTIMATORS.get("elbo")({"J": 2000, "weighting": "exact", "weight_floor": 0.0, "reduce": "sum"})
        units = est.units(r)
        d = est.prepare(r, units, torch.Generator().manual_seed(1))
        ratio = (est.estimate(PolicyCall(new, meter), r, units, d).logp
                 - est.estimate(PolicyCall(old, meter), r, units, d).logp)
    assert truth.abs().mean() > 1.0                     # log-ratios of a few nats, spread over [-4.3, 0.1]
    assert (ratio - truth).abs().mean() < 0.1 and (ratio - truth).abs().max() < 0.2
    assert torch.corrcoef(torch.stack([ratio, truth]))[0, 1] > 0.99
