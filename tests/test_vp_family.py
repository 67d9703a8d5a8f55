"""Model families: parameterisation conversions against closed forms, the VP table, and VP rollouts end to end."""
from __future__ import annotations

import math

import pytest
import torch

from bench.core.errors import UserError
from bench.core.families import FLOW, VariancePreserving, vp_alphas_cumprod
from bench.core.meter import ComputeMeter
from bench.core.policy import PolicyCall
from bench.worlds.digits_model import DigitsFlowMLP
from estimators import ESTIMATORS
from samplers import SAMPLERS
from samplers.tree import tree_nfe

VP_EPS = VariancePreserving(vp_alphas_cumprod(), "epsilon", steps_offset=1)
VP_V = VariancePreserving(vp_alphas_cumprod(), "v_prediction", steps_offset=1)
FAMILIES = {"flow": FLOW, "vp_eps": VP_EPS, "vp_v": VP_V}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_targets_invert_to_x0_and_eps(name):
    fam = FAMILIES[name]
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(6, 5, generator=g, dtype=torch.float64)
    t = torch.tensor([0.05, 0.2, 0.4, 0.6, 0.8, 0.97], dtype=torch.float64)
    x = fam.noise(x0, eps, t)
    a, s = fam.alpha_sigma(t)
    torch.testing.assert_close(x, a[:, None] * x0 + s[:, None] * eps, rtol=0, atol=1e-12)
    torch.testing.assert_close(a**2 + s**2 if name != "flow" else a + s, torch.ones_like(t), rtol=0, atol=1e-12)
    x0_hat, eps_hat = fam.x0_eps(x, fam.target(x0, eps, t), t)
    torch.testing.assert_close(x0_hat, x0, rtol=0, atol=1e-10)
    torch.testing.assert_close(eps_hat, eps, rtol=0, atol=1e-10)


def test_eps_from_v_and_x0_from_eps_by_hand():
    # abar = alphas_cumprod[499] at t = 500 / 1000: alpha = sqrt(abar), sigma = sqrt(1 - abar).
    t = torch.tensor([0.5], dtype=torch.float64)
    abar = float(vp_alphas_cumprod()[499])
    a, s = math.sqrt(abar), math.sqrt(1 - abar)
    x, out = torch.tensor([[0.3, -1.2]], dtype=torch.float64), torch.tensor([[0.7, 0.1]], dtype=torch.float64)
    x0, eps = VP_V.x0_eps(x, out, t)
    torch.testing.assert_close(eps, torch.tensor([[s * 0.3 + a * 0.7, s * -1.2 + a * 0.1]], dtype=torch.float64))
    torch.testing.assert_close(x0, torch.tensor([[a * 0.3 - s * 0.7, a * -1.2 - s * 0.1]], dtype=torch.float64))
    x0, eps = VP_EPS.x0_eps(x, out, t)
    torch.testing.assert_close(x0, (x - s * out) / a)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_score_of_gaussian_data(name):
    """Data N(m, c^2): the exact denoiser gives eps_hat = sigma (x - alpha m) / (alpha^2 c^2 + sigma^2), and the
    family's score must be the marginal's, -(x - alpha m) / (alpha^2 c^2 + sigma^2)."""
    fam, m, c = FAMILIES[name], 0.4, 0.7
    t = torch.linspace(0.1, 0.9, 5, dtype=torch.float64)
    x = torch.linspace(-2, 2, 5, dtype=torch.float64)[:, None]
    a, s = (v[:, None] for v in fam.alpha_sigma(t))
    var = a**2 * c**2 + s**2
    eps_hat = s * (x - a * m) / var
    x0_hat = (x - s * eps_hat) / a
    out = fam.target(x0_hat, eps_hat, t)
    torch.testing.assert_close(fam.score(x, out, t), -(x - a * m) / var, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", ["vp_eps", "vp_v"])
def test_ode_velocity_and_elbo_weight_by_finite_differences(name):
    fam = FAMILIES[name]
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0.3005, 0.6005, 0.9005], dtype=torch.float64)  # mid-knot: abar is linear there
    h = 2e-4
    dx = (fam.noise(x0, eps, t + h) - fam.noise(x0, eps, t - h)) / (2 * h)
    torch.testing.assert_close(fam.ode_velocity(fam.noise(x0, eps, t), fam.target(x0, eps, t), t), dx, rtol=1e-6, atol=1e-8)
    # ELBO weight: -SNR'/2 times (d x0_hat / d out)^2; SNR = abar / (1 - abar).
    snr = lambda u: fam.abar(u)[0] / (1 - fam.abar(u)[0])  # noqa: E731
    dsnr = (snr(t + h) - snr(t - h)) / (2 * h)
    a, s = fam.alpha_sigma(t)
    scale2 = (s / a) ** 2 if name == "vp_eps" else s**2
    torch.testing.assert_close(fam.elbo_weight(t), -0.5 * dsnr * scale2, rtol=1e-6, atol=0)
    torch.testing.assert_close(FLOW.elbo_weight(t), (1 - t) / t)


def test_ddim_on_flow_is_euler_and_vp_rejects_shift_and_flow_kernels():
    x, v = torch.randn(4, 3), torch.randn(4, 3)
    t, tn = torch.full((4,), 0.7), torch.full((4,), 0.4)
    torch.testing.assert_close(FLOW.ode_step(x, v, t, tn), x + (tn - t)[:, None] * v)
    mu, std = SAMPLERS.get("ddim")({"name": "ddim", "eta": 0.0}).kernel.bind(FLOW).mean_scale(x, v, t, tn)
    torch.testing.assert_close(mu, x - 0.3 * v, rtol=0, atol=1e-6)
    assert float(std.abs().max()) == 0
    with pytest.raises(UserError, match="shift"):
        VP_EPS.schedule(10, 3.0)
    with pytest.raises(UserError, match="flow-matching"):
        SAMPLERS.get("flow_sde")({"name": "flow_sde"}).kernel.bind(VP_EPS)
    assert "flow-matching" in SAMPLERS.get("flow_sde")({"name": "flow_sde"}).family_incompatibility("vp")
    assert SAMPLERS.get("ddim")({"name": "ddim"}).family_incompatibility("vp") is None


def _vp_policy():
    torch.manual_seed(0)
    return DigitsFlowMLP(hidden=32, depth=2, family=VP_EPS).eval()


def test_tree_of_ddim_steps_on_a_vp_model():
    policy, meter = _vp_policy(), ComputeMeter()
    sampler = SAMPLERS.get("tree")({"name": "tree", "kernel": "ddim", "branches": 2, "depth": 2,
                                    "window": {"schedule": "fixed", "start": 3}})
    with meter.phase("rollout"), torch.no_grad():
        r = sampler.sample(PolicyCall(policy, meter), ["a"], torch.tensor([4]), 4, (64,), torch.Generator().manual_seed(0))
    assert len(r.leaves) == 4 and meter.current.rollout_forwards == tree_nfe(2, 2, 3, 10)
    assert r.family is VP_EPS and torch.equal(VP_EPS.model_time(r.schedule[:-1]), VP_EPS.timesteps(10).float())
    est = ESTIMATORS.get("stepwise")({"name": "stepwise", "reduce": "sum"})
    units = est.units(r)
    with meter.phase("train"), torch.no_grad():
        logp = est.estimate(PolicyCall(policy, meter), r, units, {}).logp
    torch.testing.assert_close(logp, r.logp_old[units], rtol=0, atol=1e-3)


def test_vp_elbo_is_the_ddpm_loss_with_common_random_numbers():
    policy, meter = _vp_policy(), ComputeMeter()
    with meter.phase("rollout"), torch.no_grad():
        r = SAMPLERS.get("ode")({"name": "ode", "steps": 10}).sample(PolicyCall(policy, meter), ["a", "b"],
                                                                    torch.tensor([1, 2]), 2, (64,),
                                                                    torch.Generator().manual_seed(0))
    est = ESTIMATORS.get("elbo")({"name": "elbo", "J": 3, "weighting": "uniform"})
    units = est.units(r)
    draws = est.prepare(r, units, torch.Generator().manual_seed(5))
    with meter.phase("train"), torch.no_grad():
        out = est.estimate(PolicyCall(policy, meter), r, units, draws)
    # By hand: x_t = sqrt(abar) x0 + sqrt(1 - abar) eps, ELBO = -mean_j mean_dims |eps_theta(x_t) - eps|^2.
    x0, t, eps = r.x[units], draws["t"], draws["eps"]
    ab = VP_EPS.abar(t)[0].float()
    x_t = ab.sqrt()[..., None] * x0[:, None] + (1 - ab).sqrt()[..., None] * eps
    cond = r.node_cond(units).repeat_interleave(3)
    with torch.no_grad():
        e = policy.velocity(x_t.flatten(0, 1), t.flatten(), cond)
    ref = -((e - eps.flatten(0, 1)) ** 2).mean(1).view(len(units), 3).mean(1)
    torch.testing.assert_close(out.logp, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # 400 RK4 steps of exact divergences: ~30 s alone, minutes on a busy machine
def test_exact_likelihood_of_gaussian_data_under_the_vp_ode():
    """Data N(0, c^2 I) and its exact eps model: the CNF log-likelihood from DDIM's last time t0 = 1/N is the
    marginal's, log N(x; 0, (abar c^2 + 1 - abar) I), up to the prior mismatch at t = 1 (abar = 0.0047)."""
    from estimators.exact import cnf_log_likelihood

    c, fam = 0.5, VP_EPS

    def eps_model(y, t, cond):
        ab = fam.abar(t)[0].to(y.dtype)[:, None]
        return (1 - ab).sqrt() * y / (ab * c**2 + 1 - ab)

    f = lambda y, t, cond: fam.ode_velocity(y, eps_model(y, t, cond), t)  # noqa: E731
    x = torch.tensor([[0.3, -0.4], [0.8, 0.1]], dtype=torch.float64)
    t0 = float(fam.schedule(10)[-1])
    logp, _ = cnf_log_likelihood(f, x, None, steps=400, method="rk4", t0=t0)
    var = float(fam.abar(torch.tensor(t0))[0]) * c**2 + 1 - float(fam.abar(torch.tensor(t0))[0])
    ref = -0.5 * (x**2).sum(1) / var - math.log(2 * math.pi * var)
    torch.testing.assert_close(logp, ref, rtol=0, atol=0.02)
