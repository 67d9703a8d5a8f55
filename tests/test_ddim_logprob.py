"""The DDIM step's transition and log-prob against DDPO's formula and diffusers' DDIMScheduler.step (float64).

The reference below is transcribed from kvablack/ddpo-pytorch, ddpo_pytorch/diffusers_patch/ddim_with_logprob.py,
function `ddim_step_with_logprob`, at commit 1958463f020112c9a7bc85768d296daacc2e1b4b: prev timestep
t - N // steps clamped at 0, the DDIM variance (1 - abar') / (1 - abar) (1 - abar / abar'), std = eta sqrt(var),
mean = sqrt(abar') x0_hat + sqrt(1 - abar' - std^2) eps_hat, and the Gaussian log-prob averaged over all but the
batch dimension.
"""
from __future__ import annotations

import math

import pytest
import torch

from bench.core.families import VariancePreserving, vp_alphas_cumprod
from bench.core.meter import ComputeMeter
from bench.core.policy import PolicyCall
from bench.worlds.digits_model import DigitsFlowMLP
from estimators import ESTIMATORS
from samplers import SAMPLERS
from samplers.ddim_kernel import DDIMKernel
from samplers.kernels import gaussian_logp

SD15 = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            set_alpha_to_one=False, steps_offset=1, clip_sample=False)


def ddpo_step_with_logprob(alphas_cumprod, final_alpha_cumprod, num_train, num_inference, prediction, model_output,
                           timestep, sample, eta, prev_sample):
    """ddpo-pytorch's ddim_step_with_logprob (commit 1958463), transcribed: returns (mean, std, log_prob)."""
    prev_timestep = timestep - num_train // num_inference
    prev_timestep = torch.clamp(prev_timestep, 0, num_train - 1)
    alpha_prod_t = alphas_cumprod.gather(0, timestep)
    alpha_prod_t_prev = torch.where(prev_timestep >= 0, alphas_cumprod.gather(0, prev_timestep), final_alpha_cumprod)
    shape = (-1,) + (1,) * (sample.ndim - 1)
    alpha_prod_t, alpha_prod_t_prev = alpha_prod_t.view(shape), alpha_prod_t_prev.view(shape)
    beta_prod_t = 1 - alpha_prod_t
    if prediction == "epsilon":
        pred_original_sample = (sample - beta_prod_t ** 0.5 * model_output) / alpha_prod_t ** 0.5
        pred_epsilon = model_output
    else:  # v_prediction
        pred_original_sample = alpha_prod_t ** 0.5 * sample - beta_prod_t ** 0.5 * model_output
        pred_epsilon = alpha_prod_t ** 0.5 * model_output + beta_prod_t ** 0.5 * sample
    variance = ((1 - alpha_prod_t_prev) / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
    std_dev_t = eta * variance ** 0.5
    pred_sample_direction = (1 - alpha_prod_t_prev - std_dev_t ** 2) ** 0.5 * pred_epsilon
    prev_sample_mean = alpha_prod_t_prev ** 0.5 * pred_original_sample + pred_sample_direction
    log_prob = (-((prev_sample - prev_sample_mean) ** 2) / (2 * std_dev_t ** 2) - torch.log(std_dev_t)
                - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi, dtype=sample.dtype))))
    return prev_sample_mean, std_dev_t.flatten(), log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_ddim_kernel_logprob_equals_ddpo(prediction, eta):
    steps = 50
    family = VariancePreserving(vp_alphas_cumprod(), prediction, set_alpha_to_one=False, steps_offset=1)
    ac = family.knots[1:]  # float64 copy of the float32 table
    grid = family.schedule(steps).double()
    ts = family.timesteps(steps)
    g = torch.Generator().manual_seed(0)
    b = len(ts)  # one sample per step, the last (into alphas_cumprod[0]) included
    x = torch.randn(b, 4, 3, 3, generator=g, dtype=torch.float64)
    out = torch.randn(b, 4, 3, 3, generator=g, dtype=torch.float64)
    kernel = DDIMKernel(eta).bind(family)
    mu, std = kernel.mean_scale(x, out, grid[:-1], grid[1:])
    prev = mu + std.view(-1, 1, 1, 1) * torch.randn(x.shape, generator=g, dtype=torch.float64)
    ref_mu, ref_std, ref_logp = ddpo_step_with_logprob(ac, ac[0], 1000, steps, prediction, out, ts, x, eta, prev)
    torch.testing.assert_close(mu, ref_mu, rtol=0, atol=1e-10)
    torch.testing.assert_close(std, ref_std, rtol=0, atol=1e-10)
    torch.testing.assert_close(gaussian_logp(prev, mu, std, "mean"), ref_logp, rtol=0, atol=1e-10)


def test_family_table_and_grid_equal_diffusers_ddim_scheduler():
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(**SD15)
    family = VariancePreserving.from_config(SD15)
    assert torch.equal(family.knots[1:].float(), sched.alphas_cumprod)
    for steps in (10, 50):
        sched.set_timesteps(steps)
        assert torch.equal(family.timesteps(steps), sched.timesteps)
        grid = family.schedule(steps)
        # Grid times map back to the scheduler's integer timesteps; the last step lands on alphas_cumprod[0].
        assert torch.equal(family.model_time(grid[:-1]), sched.timesteps.float())
        assert family.abar(grid[-1:])[0].item() == pytest.approx(float(sched.final_alpha_cumprod), abs=0)
    trailing = DDIMScheduler(**{**SD15, "timestep_spacing": "trailing", "steps_offset": 0})
    trailing.set_timesteps(10)
    fam_t = VariancePreserving.from_config({**SD15, "timestep_spacing": "trailing", "steps_offset": 0})
    assert torch.equal(fam_t.timesteps(10), trailing.timesteps)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_ddim_kernel_equals_diffusers_step(prediction):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(**SD15, prediction_type=prediction)
    sched.set_timesteps(10)
    family = VariancePreserving.from_config({**SD15, "prediction_type": prediction})
    grid = family.schedule(10)
    kernel = DDIMKernel(1.0).bind(family)
    g = torch.Generator().manual_seed(1)
    for i, t in enumerate(sched.timesteps):
        x, out, z = (torch.randn(2, 4, 4, 4, generator=g) for _ in range(3))
        ref = sched.step(out, t, x, eta=1.0, variance_noise=z).prev_sample
        mu, std = kernel.mean_scale(x, out, grid[i].expand(2), grid[i + 1].expand(2))
        torch.testing.assert_close(mu + std.view(-1, 1, 1, 1) * z, ref, rtol=0, atol=2e-6)


def test_ddim_rollout_logp_is_recomputed_by_stepwise():
    """The log-density stored while sampling a DDIM rollout is what the stepwise estimator recomputes: ratio 1."""
    torch.manual_seed(0)
    policy = DigitsFlowMLP(hidden=32, depth=2, family=VariancePreserving.from_config(SD15)).eval()
    meter = ComputeMeter()
    sampler = SAMPLERS.get("ddim")({"steps": 10, "eta": 1.0})
    with meter.phase("rollout"), torch.no_grad():
        r = sampler.sample(PolicyCall(policy, meter), ["a", "b"], torch.tensor([3, 7]), 3, (64,),
                           torch.Generator().manual_seed(0))
    assert int((r.kind == 2).sum()) == 2 * 3 * 10  # every DDIM step stochastic (the last lands on abar_0 < 1)
    est = ESTIMATORS.get("stepwise")({"name": "stepwise", "reduce": "mean"})
    units = est.units(r)
    with meter.phase("train"), torch.no_grad():
        logp = est.estimate(PolicyCall(policy, meter), r, units, {}).logp
    torch.testing.assert_close(r.logp_old[units] / 64, logp, rtol=0, atol=2e-5)
