"""Parity: each option that a method preset sets to its paper's code, against that code's formula.

Every reference below is transcribed from the peer's repository (file and commit in the test's docstring) and
evaluated in float64 on random inputs; our function must agree to 1e-10 (the diffusers schedule, which the
scheduler itself stores in float32, to the bit). docs/parity.md lists the knobs these tests cover.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from bench.training.ema import ema_decay
from bench.core.meter import ComputeMeter
from bench.core.policy import Policy, PolicyCall
from estimators.base import Estimate
from estimators.elbo import ELBOEstimator
from objectives.filtering import drop_zero_advantage
from objectives.group_advantage import GroupAdvantage, normalise_groups
from objectives.kl import transition_kl, transition_kl_dt
from samplers import SAMPLERS
from samplers.kernels import CPSSDE, FlowSDE
from samplers.mix import MixSampler
from samplers.rollout import SDE
from samplers.schedule import flow_schedule, scheduler_schedule, shift_time
from samplers.solvers import DPMSolverPP2M
from samplers.window import WindowSchedule

TOL = dict(rtol=0, atol=1e-10)


class LinearPolicy(Policy):
    """v(x, t) = x W + t b in float64: a smooth stand-in with a closed form."""

    def __init__(self, dim: int = 6, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(0.3 * torch.randn(dim, dim, generator=g, dtype=torch.float64))
        self.b = nn.Parameter(torch.randn(dim, generator=g, dtype=torch.float64))

    def velocity(self, x, t, cond):
        # float64 in and out; a float32 input (a sampler's noise) gets a float32 output.
        return (x.double() @ self.w + t.reshape(-1, 1).double() * self.b).to(x.dtype)


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --- time grid -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [4, 10, 14, 25])
def test_scheduler_grid_is_diffusers_set_timesteps(shift, steps):
    """Flow-GRPO, DiffusionNFT, the ELBO repo and AWM sample on FlowMatchEulerDiscreteScheduler.set_timesteps
    (yifan123/flow_grpo flow_grpo/diffusers_patch/sd3_pipeline_with_logprob.py@ac4c86e, retrieve_timesteps): our
    grid equals the scheduler's own sigmas (float32, as it stores them) bit for bit; the linspace grid does not."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sch = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    sch.set_timesteps(steps)
    assert torch.equal(scheduler_schedule(steps, shift), sch.sigmas)
    sampler = SAMPLERS.get("flow_sde")({"steps": steps, "shift": shift, "time_grid": "scheduler"})
    assert torch.equal(sampler.schedule(), sch.sigmas)
    if shift == 3.0 and steps == 10:
        assert (flow_schedule(steps, shift) - sch.sigmas).abs().max() > 0.2  # the 0.24


# --- CPS log-prob and the stepwise KL -----------------------------------------------------------------------------

def test_cps_squared_error_logp_is_flow_grpo_cps():
    """yifan123/flow_grpo flow_grpo/diffusers_patch/sd3_sde_with_logprob.py@54809b5 (sde_type='cps'):
    std = sigma_prev sin(a pi/2), mean = x0_hat (1 - sigma_prev) + eps_hat sqrt(sigma_prev^2 - std^2),
    log_prob = -((prev - mean)^2).mean(dims)."""
    sched = scheduler_schedule(10, 3.0).double()
    x, v, noise = _rand(4, 3, 5, seed=1), _rand(4, 3, 5, seed=2), _rand(4, 3, 5, seed=3)
    kernel = CPSSDE(0.7, "squared_error")
    for i in range(9):
        sigma, sigma_prev = sched[i], sched[i + 1]
        std_ref = sigma_prev * math.sin(0.7 * math.pi / 2)
        mean_ref = (x - sigma * v) * (1 - sigma_prev) + (x + v * (1 - sigma)) * torch.sqrt(sigma_prev**2 - std_ref**2)
        prev = mean_ref + std_ref * noise
        logp_ref = -((prev - mean_ref) ** 2).mean(dim=(1, 2))
        mu, s = kernel.mean_scale(x, v, sigma.expand(4), sigma_prev.expand(4), sched)
        torch.testing.assert_close(mu, mean_ref, **TOL)
        torch.testing.assert_close(s, std_ref.expand(4), **TOL)
        torch.testing.assert_close(kernel.logp(prev, mu, s, "mean"), logp_ref, **TOL)
        # The Gaussian's log-ratio is this one over 2 s^2: the variance term scales every ratio.
        full = CPSSDE(0.7, "gaussian")
        mu2 = mu + 0.01
        ratio_full = full.logp(prev, mu2, s, "mean") - full.logp(prev, mu, s, "mean")
        ratio_cps = kernel.logp(prev, mu2, s, "mean") - kernel.logp(prev, mu, s, "mean")
        torch.testing.assert_close(ratio_full * 2 * std_ref**2, ratio_cps, **TOL)


def _kl_inputs(kernel, sched, i, seed):
    b, d = 5, 6
    policy, ref = LinearPolicy(d, seed), LinearPolicy(d, seed + 1)
    x = _rand(b, d, seed=seed)
    t = sched[i].expand(b)
    v = policy.velocity(x, t, None)
    est = Estimate(torch.zeros(b), v, x, t, None, torch.arange(b))
    rollout = SimpleNamespace(kind=torch.full((b,), SDE), t=sched[i + 1].expand(b), kernel=kernel, schedule=sched,
                              scale=kernel.mean_scale(x, v, t, sched[i + 1].expand(b), sched)[1])
    return est, (lambda xx, tt, cc: ref.velocity(xx, tt, cc)), rollout, torch.arange(b), x, v, ref


@pytest.mark.parametrize("i", [0, 3, 8])
def test_transition_dt_kl_is_flow_grpo_kl(i):
    """yifan123/flow_grpo scripts/train_sd3.py@ac4c86e: kl_loss = ((prev_sample_mean - prev_sample_mean_ref)^2)
    .mean(dims) / (2 std_dev_t^2) with std_dev_t = sqrt(sigma / (1 - where(sigma == 1, sigma_max, sigma))) a from
    sde_step_with_logprob (sigma_max = sigmas[1]); the exact Gaussian KL is that over |dt|."""
    sched = scheduler_schedule(10, 3.0).double()
    kernel = FlowSDE(0.7)
    est, ref_fn, rollout, units, x, v, ref = _kl_inputs(kernel, sched, i, seed=10 + i)
    sigma, sigma_prev, sigma_max = sched[i], sched[i + 1], sched[1]
    dt = sigma_prev - sigma
    std_dev_t = torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma))) * 0.7

    def mean(out):  # Flow-GRPO's prev_sample_mean
        return x * (1 + std_dev_t**2 / (2 * sigma) * dt) + out * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt

    v_ref = ref.velocity(x, sigma.expand(len(x)), None)
    kl_ref = (((mean(v) - mean(v_ref)) ** 2).mean(dim=1) / (2 * std_dev_t**2)).mean()
    torch.testing.assert_close(transition_kl_dt(est, ref_fn, rollout, units), kl_ref, **TOL)
    torch.testing.assert_close(transition_kl(est, ref_fn, rollout, units), kl_ref / -dt, **TOL)


# --- trained steps, filtering, advantages ---------------------------------------------------------------------------

def test_trained_steps_follow_flow_grpo_and_dance_grpo_rounding():
    """Flow-GRPO (scripts/train_sd3.py@ac4c86e): num_train_timesteps = int(num_steps * 0.99), trained in order
    range(num_train_timesteps); DanceGRPO (fastvideo/train_grpo_flux.py@15cc71d): int(T * 0.6) of a per-sample
    randperm."""
    g = torch.Generator().manual_seed(0)
    flow = SAMPLERS.get("flow_sde")({"steps": 10, "train_fraction": 0.99, "train_rounding": "floor",
                                     "train_steps": "first"})
    mask = flow.trained_mask(torch.ones(10, dtype=torch.bool), 4, g)
    assert mask[:9].all() and not mask[9].any()  # int(9.9) = 9 first steps; round would train all 10
    for steps, fraction in [(16, 0.6), (25, 0.6), (10, 0.6)]:
        dance = SAMPLERS.get("dance")({"steps": steps, "train_fraction": fraction, "train_rounding": "floor"})
        counts = dance.trained_mask(torch.ones(steps, dtype=torch.bool), 7, g).sum(0)
        assert (counts == int(steps * fraction)).all()
        nearest = SAMPLERS.get("dance")({"steps": steps, "train_fraction": fraction})
        assert (nearest.trained_mask(torch.ones(steps, dtype=torch.bool), 7, g).sum(0) == round(steps * fraction)).all()


def test_drop_zero_advantage_is_flow_grpo_mask():
    """Flow-GRPO scripts/train_sd3.py@ac4c86e: mask = samples['advantages'].abs().sum(dim=1) != 0 over the
    repeated per-timestep advantages; a chain's units share its advantage, so the per-unit mask is the same."""
    adv_leaf = torch.tensor([0.5, 0.0, -1.2, 0.0, 2.0], dtype=torch.float64)
    steps = 3
    per_step = adv_leaf.unsqueeze(1).repeat(1, steps)
    mask_ref = per_step.abs().sum(dim=1) != 0
    units = torch.arange(5 * steps)
    adv_units = adv_leaf.repeat_interleave(steps)
    kept, adv_kept = drop_zero_advantage(units, adv_units)
    torch.testing.assert_close(kept, units[mask_ref.repeat_interleave(steps)], rtol=0, atol=0)
    torch.testing.assert_close(adv_kept, per_step[mask_ref].reshape(-1), **TOL)


def test_advantages_unbiased_std_is_dance_grpo_and_population_global_std_is_flow_grpo():
    """DanceGRPO fastvideo/train_grpo_flux.py@15cc71d (use_group): (r - mean) / (r.std() + 1e-8), torch's unbiased
    std per group; Flow-GRPO flow_grpo/stat_tracking.py@ac4c86e (global_std): (r - mean_prompt) /
    (np.std(all rewards) + 1e-4)."""
    r = _rand(24, seed=5).abs()
    group = torch.arange(4).repeat_interleave(6)
    dance_ref = torch.empty_like(r)
    for k in range(4):
        gr = r[k * 6:(k + 1) * 6]
        dance_ref[k * 6:(k + 1) * 6] = (gr - gr.mean()) / (gr.std() + 1e-8)
    torch.testing.assert_close(normalise_groups(r, group, False, 1e-8, unbiased=True), dance_ref, **TOL)
    rn = r.numpy()
    flow_ref = np.empty_like(rn)
    for k in range(4):
        flow_ref[k * 6:(k + 1) * 6] = (rn[k * 6:(k + 1) * 6] - rn[k * 6:(k + 1) * 6].mean()) / (np.std(rn) + 1e-4)
    np.testing.assert_allclose(normalise_groups(r, group, True, 1e-4).numpy(), flow_ref, rtol=0, atol=1e-10)


def test_awm_advantage_max_and_elbo_repo_exact_advantage():
    """AWM scripts/train_sd3_awm.py@be51372: clamp(A, -adv_clip_max, adv_clip_max) / adv_clip_max * advantage_max;
    the ELBO repo src/utils/__init__.py@c257000 (adv='exact'): beta (R - mean) / alpha, unclipped."""
    rollout = SimpleNamespace(reward=_rand(12, seed=6) * 3, leaf_slot=torch.arange(3).repeat_interleave(4),
                              prompts=["a", "b", "c"])
    awm = GroupAdvantage({"global_std": True, "clip": 5.0, "rescale_max": 1.0})
    base = normalise_groups(rollout.reward.float(), rollout.leaf_slot, True, 1e-4)
    torch.testing.assert_close(awm.leaf_advantages(rollout), base.clamp(-5, 5) / 5 * 1.0, rtol=0, atol=1e-6)
    exact = GroupAdvantage({"normalise": "none", "scale": 0.1, "clip": None})
    r = rollout.reward.float()
    mean = torch.stack([r[k * 4:(k + 1) * 4].mean() for k in range(3)]).repeat_interleave(4)
    torch.testing.assert_close(exact.leaf_advantages(rollout), 1e-4 * (r - mean) / 1e-3, rtol=0, atol=1e-6)


# --- what the reward scores -----------------------------------------------------------------------------------------

def test_x0_hat_scoring_is_dance_grpo_pred_original():
    """DanceGRPO fastvideo/train_grpo_flux.py@15cc71d: run_sample_step returns latents = pred_original of the last
    flux_step, pred_original_sample = latents - sigma * model_output, and that is what is decoded and rewarded."""
    policy, meter = LinearPolicy(6), ComputeMeter()
    model = PolicyCall(policy, meter)
    sampler = SAMPLERS.get("dance")({"steps": 5, "score": "x0_hat"})
    with torch.no_grad(), meter.phase("rollout"):
        r = sampler.sample(model, ["a"], torch.zeros(1), 3, (6,), torch.Generator().manual_seed(0))
    last = r.parent[r.leaves]  # the nodes at step T-1 (float32, as the sampler stores them)
    sigma = r.t[last]
    x = r.x[last]
    pred_original = x - sigma.unsqueeze(1) * policy.velocity(x, sigma, None)
    torch.testing.assert_close(r.reward_input, pred_original, rtol=0, atol=0)
    assert not torch.allclose(r.reward_input, r.x0)


# --- ELBO options -----------------------------------------------------------------------------------------------------

def _elbo_setup(cfg, guidance=1.0, seed=7):
    policy = LinearPolicy(6, seed)
    x0 = _rand(3, 6, seed=seed + 1)
    leaves = torch.arange(3)
    rollout = SimpleNamespace(leaves=leaves, x=x0, schedule=scheduler_schedule(10, 3.0).double(), guidance=guidance,
                              node_cond=lambda units: torch.zeros(len(units)), family=None)
    est = ELBOEstimator({"J": 4, "timesteps": "uniform", **cfg})
    from bench.core.families import FLOW
    rollout.family = FLOW
    units = est.units(rollout)
    draws = est.prepare(rollout, units, torch.Generator().manual_seed(seed))
    draws = {k: v.double() for k, v in draws.items()}
    model = lambda x, t, c: policy.velocity(x, t, c)  # noqa: E731
    return est, rollout, units, draws, model, x0, policy


def _elbo_repo(method, t, v, xt, x0, noise, g=1.0):
    """jaemoo-choi/rethinking-diffusion-rl src/utils/__init__.py@c257000, compute_elbo, transcribed."""
    dims = tuple(range(1, x0.ndim))
    if method == "adaptive":
        x0_pred = xt - t * v
        w = torch.abs(x0_pred - x0).mean(dim=dims, keepdim=True).clip(min=0.00001)
        return -((x0_pred - x0) ** 2 / w).mean(dim=dims) / g
    if method == "t":
        return -((xt - t * v - x0) ** 2).mean(dim=dims)
    if method == "uniform":
        return -((noise - x0 - v) ** 2).mean(dim=dims) / (g * g)
    raise ValueError(method)


@pytest.mark.parametrize("ours,theirs", [("uniform", "uniform"), ("adaptive", "adaptive"), ("x0", "t")])
@pytest.mark.parametrize("guidance", [1.0, 4.5])
def test_per_draw_elbo_with_guidance_division_is_elbo_repo(ours, theirs, guidance):
    """The ELBO repo computes one ELBO (and ratio) per timestep draw, divides adaptive by G and uniform by G^2,
    and its `t` weighting is the x0-space error |x_t - t v - x0|^2 (src/utils/__init__.py@c257000 compute_elbo;
    src/utils/base.py@c257000 compute_loss runs per j_idx)."""
    est, rollout, units, draws, model, x0, policy = _elbo_setup(
        {"weighting": ours, "per_draw": True, "divide_by_guidance": True}, guidance)
    assert len(units) == 12 and (units == torch.arange(3).repeat_interleave(4)).all()
    t = draws["t"].reshape(-1, 1)
    if ours == "x0":  # prepare() draws in float32; the weight is t^2 of those times
        torch.testing.assert_close(draws["w"].reshape(-1, 1), t**2, rtol=1e-6, atol=0)
        draws["w"] = (t**2).reshape(draws["w"].shape)
    out = est.estimate(model, rollout, units, draws)
    eps = draws["eps"].reshape(12, 6)
    x0u = x0[units]
    xt = (1 - t) * x0u + t * eps
    v = policy.velocity(xt, t.reshape(-1), None)
    torch.testing.assert_close(out.logp, _elbo_repo(theirs, t, v, xt, x0u, eps, guidance), rtol=0, atol=1e-9)


def test_ghuber_weighting_is_awm():
    """scxue/advantage_weighted_matching advantage_weighted_matching/scripts/train_sd3_awm.py@be51372,
    compute_log_prob_awm: log_prob = -((model_output - (noise - x0))^2).mean(dims), then ghuber:
    -((-log_prob + 1e-10)^p - 1e-10^p) t / p."""
    est, rollout, units, draws, model, x0, policy = _elbo_setup({"weighting": "ghuber", "ghuber_power": 0.25,
                                                                "per_draw": True, "J": 6})
    out = est.estimate(model, rollout, units, draws)
    t = draws["t"].reshape(-1)
    eps = draws["eps"].reshape(len(units), 6)
    x0u = x0[units]
    xt = (1 - t[:, None]) * x0u + t[:, None] * eps
    log_prob = -((policy.velocity(xt, t, None) - (eps - x0u)) ** 2).mean(dim=1)
    p = 0.25
    ref = -(torch.pow(-log_prob + 1e-10, p) - torch.pow(torch.tensor(1e-10, dtype=torch.float64), p)) * t / p
    torch.testing.assert_close(out.logp, ref, **TOL)


# --- rollout solver and EMA ramp ----------------------------------------------------------------------------------------

def test_dpm2_rollout_is_diffusion_nft_dpm2():
    """NVlabs/DiffusionNFT flow_grpo/diffusers_patch/solver.py@24af555, run_sampling(solver='dpm2',
    determistic=True): DDIM (eta 0) on the first and last step, multistep DPM-Solver++(2) in between, x0 = x - s v."""
    sched = scheduler_schedule(10, 3.0).double()
    policy = LinearPolicy(6, 3)
    z0 = _rand(4, 6, seed=9)

    def alpha_sigma(s):
        return 1 - s, s

    z, outs = z0.clone(), []
    for i in range(10):
        s, t = sched[i], sched[i + 1]
        m0 = z - s * policy.velocity(z, s.expand(4), None)
        outs.append(m0)
        if i == 0 or i == 9:  # ddim_update with eta = 0
            noise_pred = (z - (1 - s) * m0) / s
            z = (1 - t) * m0 + torch.sqrt(t**2) * noise_pred
            continue
        a_t, s_t = alpha_sigma(t)
        a_0, s_0 = alpha_sigma(s)
        a_1, s_1 = alpha_sigma(sched[i - 1])
        lam_t, lam_0, lam_1 = (torch.log(a) - torch.log(b) for a, b in ((a_t, s_t), (a_0, s_0), (a_1, s_1)))
        h, h_0 = lam_t - lam_0, lam_0 - lam_1
        d1 = (1.0 / (h_0 / h)) * (m0 - outs[-2])
        z = (s_t / s_0) * z - (a_t * (torch.exp(-h) - 1.0)) * m0 - 0.5 * (a_t * (torch.exp(-h) - 1.0)) * d1
    solver, x = DPMSolverPP2M(), z0.clone()
    model = lambda xx, tt, cc: policy.velocity(xx, tt, cc)  # noqa: E731
    for i in range(10):
        x = solver.step(model, x, policy.velocity(x, sched[i].expand(4), None), i, sched, None)
    torch.testing.assert_close(x, z, **TOL)
    ode = SAMPLERS.get("ode")({"steps": 10, "shift": 3.0, "time_grid": "scheduler", "solver": "dpmpp_2m"})
    assert isinstance(ode.ode_solver(torch.zeros(10, dtype=torch.bool)), DPMSolverPP2M)


def test_ema_ramp_in_optimizer_steps_is_diffusion_nft_return_decay():
    """NVlabs/DiffusionNFT scripts/train_nft_sd3.py@24af555 return_decay(global_step, decay_type=1): flat 0,
    uprate 0.001, uphold 0.5, with global_step counting optimizer steps."""
    def return_decay(step):
        return 0.0 if step < 0 else min((step - 0) * 0.001, 0.5)

    cfg = {"ema_decay": 0.5, "ema_ramp": {"rate": 0.001, "flat": 0, "count": "optimizer_steps"}}
    for iteration, steps in [(1, 2), (10, 20), (300, 600), (1000, 1000)]:
        assert abs(ema_decay(cfg, iteration, steps) - return_decay(steps)) < 1e-12
    cfg_it = {"ema_decay": 0.5, "ema_ramp": {"rate": 0.001, "flat": 0}}
    assert ema_decay(cfg_it, 10, 20) == pytest.approx(0.01)


# --- MixGRPO windows and the Flash grid -----------------------------------------------------------------------------------

class _MixGRPOStates:
    """Tencent-Hunyuan/MixGRPO fastvideo/utils/grpo_states.py@e5cdd6a, progressive with prog_overlap, roll_back."""

    def __init__(self, iters_per_group, group_size, max_timesteps, step=1):
        self.iters, self.w, self.max, self.step = iters_per_group, group_size, max_timesteps, step
        self.cur, self.it = 0, 0

    def timesteps(self):
        return list(range(self.cur, min(self.cur + self.w, self.max)))

    def update(self):
        self.it += 1
        if self.it >= self.iters:
            self.it = 0
            self.cur += self.step
        if self.cur > self.max:
            self.cur, self.it = 0, 0


def test_mix_window_cap_and_ranges_are_mixgrpo():
    """MixGRPO train_grpo_flux.py@e5cdd6a: max_timesteps = sampling_steps - 2, window range(cur, min(cur + w,
    max)); random starts rng.integers(0, max - w + 1). At cur = T - 2 the window is empty (no step trained)."""
    steps, w, every = 10, 4, 3
    ours = WindowSchedule({"schedule": "progressive", "start": 0, "stride": 1, "every": every, "roll_back": True,
                           "end_margin": 2}, steps, w)
    ref = _MixGRPOStates(every, w, steps - 2)
    for iteration in range(1, 200):
        expect = ref.timesteps()
        ref.update()
        got = ours.mask(ours.start(iteration), steps).nonzero().squeeze(1).tolist()
        assert got == expect, iteration
    rnd = WindowSchedule({"schedule": "random", "end_margin": 2}, steps, w)
    assert (rnd.lo, rnd.hi) == (0, steps - 2 - w)


def test_flash_post_window_grid_is_mixgrpo():
    """MixGRPO fastvideo/utils/sampling_utils.py@e5cdd6a run_sample_step (dpm_apply_strategy='post'): num_post_steps =
    int(max((len(sigmas) - 1 - last) * ratio, 1)) points on shift(linspace(linspace(1, 0, T + 1)[last + 1], 0, n))."""
    steps, shift, ratio = 25, 3.0, 0.4
    sampler = MixSampler({"steps": steps, "shift": shift, "window": {"size": 4, "schedule": "fixed", "start": 2},
                          "post_solver": "dpmpp_2m", "post_compress": ratio, "post_keep": "floor_points"})
    sched, sde = sampler.plan(1, torch.Generator())
    base = shift_time(torch.linspace(1, 0, steps + 1, dtype=torch.float64), shift)
    last = 5  # the window's last step
    n_post = int(max((steps + 1 - 1 - last) * ratio, 1))
    post_t = torch.linspace(1, 0, steps + 1, dtype=torch.float64)[last + 1].item()
    post = shift_time(torch.linspace(post_t, 0, n_post, dtype=torch.float64), shift)
    ref = torch.cat([base[:last + 1], post])
    torch.testing.assert_close(sched.double(), ref, rtol=0, atol=1e-7)  # our grids are stored in float32
    assert len(sde) == len(ref) - 1 and sde.sum() == 4


# --- LoRA targets ---------------------------------------------------------------------------------------------------------------

def test_joint_attention_lora_set_is_the_peers_target_modules():
    """yifan123/flow_grpo scripts/train_sd3.py@ac4c86e target_modules: attn.{add_k_proj, add_q_proj, add_v_proj,
    to_add_out, to_k, to_out.0, to_q, to_v}; SD3.5's second attention attn2 is not adapted."""
    from diffusers import SD3Transformer2DModel

    from bench.worlds.sd3_policy import add_lora
    from bench.worlds.sd3_tiny import TINY

    peers = ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "attn.to_k",
             "attn.to_out.0", "attn.to_q", "attn.to_v"]
    m = SD3Transformer2DModel(**TINY["transformer"])
    expected = {n for n, _ in m.named_modules() if any(n.endswith("." + p) for p in peers)}
    add_lora(m, r=2, alpha=4, targets=["joint_attention"], seed=0)
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in m.named_parameters() if ".lora_A." in n}
    assert adapted == expected and not any(".attn2." in n for n in adapted)
    assert any(n.endswith("attn.add_q_proj") for n in adapted)


@pytest.mark.parametrize("per_draw", [False, True])
def test_grid_draws_without_replacement_are_a_permutation_prefix(per_draw):
    """NVlabs/DiffusionNFT scripts/train_nft_sd3.py@24af555 (perms_time = randperm(num_timesteps) per sample, then
    the first int(10 x 0.99) = 9 of them) and the ELBO repo src/utils/base.py@c257000 (the same per-sample
    shuffle, one loss per j_idx): each sample's 9 draws are distinct grid times of the 10."""
    est, rollout, units, draws, model, x0, policy = _elbo_setup(
        {"J": 9, "timesteps": "grid", "grid_draws": "without_replacement", "per_draw": per_draw})
    t = draws["t"].reshape(3, 9)
    grid = rollout.schedule[:-1].float()
    for row in t:
        assert len(set(row.tolist())) == 9
        assert all(bool((grid.double() == v).any()) for v in row)
    with pytest.raises(Exception, match="grid_draws=without_replacement"):
        _elbo_setup({"J": 11, "timesteps": "grid", "grid_draws": "without_replacement"})


@pytest.mark.slow  # CI runs it (python -m pytest -m slow); the default suite stays under 5 min
def test_sampling_with_the_old_policy_rolls_out_with_the_ema_weights(tmp_path, monkeypatch):
    """NVlabs/DiffusionNFT scripts/train_nft_sd3.py@24af555 and the ELBO repo src/utils/base.py@c257000 switch to
    the "old" adapter (the EMA) before sampling: from the second iteration on, the rollout's weights are the EMA's
    decay-weighted mix, not the current ones."""
    from bench.runner.config import compose_config
    from bench.training.train import train_cell
    from samplers.base import ChainSampler

    seen: list = []
    original = ChainSampler.sample

    def recording_sample(self, model, *args, **kwargs):
        seen.append(None if model.params is None else {k: v.clone() for k, v in model.params.items()})
        return original(self, model, *args, **kwargs)

    monkeypatch.setattr(ChainSampler, "sample", recording_sample)
    cfg = compose_config(["method=nft", f"results_dir={tmp_path}", "budget.iterations=2", "train.prompts_per_iter=2",
                          "train.group_size=4", "world.eval.samples_per_class=2", "train.ema_decay=0.5",
                          "train.ema_ramp=null"])
    train_cell(cfg, tmp_path / "cell")
    # Evaluation samples with the current weights (params None); the two training rollouts carry the EMA's.
    rollouts = [p for p in seen if p is not None]
    assert len(rollouts) == 2 and len(seen) > 2
    first, second = rollouts
    # Iteration 1 samples with the initial weights; iteration 2 with 0.5 initial + 0.5 after one step.
    assert any(not torch.equal(first[k], second[k]) for k in first)
