"""Final-sample ELBO likelihood (Rethinking the Design Space of RL for Diffusion Models, arXiv 2602.04663)."""
from __future__ import annotations

import torch

from bench.policy import index_cond
from estimators import ESTIMATORS
from estimators.base import Estimate, Estimator
from samplers.base import randn

TIME_SOURCES = ("grid", "uniform", "logit_normal")
WEIGHTINGS = ("uniform", "adaptive")


@ESTIMATORS.register("elbo")
class ELBOEstimator(Estimator):
    """beta * ELBO(x0) from J noisings x_t = (1-t) x0 + t eps, with common random numbers for the old policy.

    Options: `J`, `weighting` (uniform: -|v - (eps - x0)|^2; adaptive: -|x0_hat - x0|^2 / sg(|x0_hat - x0|)),
    `timesteps` (grid: the sampler's times; uniform; logit_normal), `crn` (old policy reuses the draws),
    `beta`, `t_min`/`t_max` clamp for the continuous sources.
    """

    final_sample = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.J = int(self.cfg.get("J", 4))
        self.weighting = self.cfg.get("weighting", "uniform")
        self.time_source = self.cfg.get("timesteps", "uniform")
        self.crn = bool(self.cfg.get("crn", True))
        self.beta = float(self.cfg.get("beta", 1.0))
        self.t_min, self.t_max = float(self.cfg.get("t_min", 0.02)), float(self.cfg.get("t_max", 0.98))
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"unknown ELBO weighting '{self.weighting}'; valid: {', '.join(WEIGHTINGS)}")
        if self.time_source not in TIME_SOURCES:
            raise ValueError(f"unknown ELBO timesteps '{self.time_source}'; valid: {', '.join(TIME_SOURCES)}")
        if self.J < 1:
            raise ValueError(f"ELBO J must be >= 1, got {self.J}")

    def units(self, rollout):
        return rollout.leaves

    def _draw_times(self, n: int, schedule: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.time_source == "grid":
            grid = schedule[:-1].cpu()  # the sampler's noisy times (t = 0 carries no signal)
            return grid[torch.randint(len(grid), (n,), generator=generator)]
        if self.time_source == "uniform":
            u = torch.rand(n, generator=generator)
        else:
            u = torch.sigmoid(torch.randn(n, generator=generator))
        return self.t_min + (self.t_max - self.t_min) * u

    def prepare(self, rollout, units, generator):
        u, shape = len(units), rollout.x.shape[1:]
        t = self._draw_times(u * self.J, rollout.schedule, generator).view(u, self.J).to(rollout.x.device)
        eps = randn((u, self.J, *shape), generator, rollout.x.device)
        return {"t": t, "eps": eps}

    def estimate(self, model, rollout, units, draws):
        u, j = len(units), self.J
        x0 = rollout.x[units].unsqueeze(1)                    # [U, 1, *S]
        t = draws["t"].reshape(u, j, *[1] * (x0.ndim - 2))    # [U, J, 1..]
        eps = draws["eps"]
        x_t = ((1 - t) * x0 + t * eps).flatten(0, 1)
        t_flat = draws["t"].reshape(-1)
        rep = torch.arange(u, device=units.device).repeat_interleave(j)
        cond = index_cond(rollout.node_cond(units), rep)
        v = model(x_t, t_flat, cond)
        if self.weighting == "uniform":
            err = (v - (eps - x0).flatten(0, 1)) ** 2
        else:
            x0_hat = x_t - t_flat.view(-1, *[1] * (x_t.ndim - 1)) * v
            diff = x0_hat - x0.expand_as(eps).flatten(0, 1)
            # Adaptive weight of DiffusionNFT/the ELBO paper: normalise by the stop-gradient mean error.
            norm = diff.abs().flatten(1).mean(1).detach().clamp_min(1e-6)
            err = diff**2 / norm.view(-1, *[1] * (diff.ndim - 1))
        per_draw = err.flatten(1).mean(1) if self.reduce == "mean" else err.flatten(1).sum(1)
        elbo = -per_draw.view(u, j).mean(1)
        return Estimate(self.beta * elbo, v, x_t, t_flat, cond, rep)

    def old_logp(self, model_old, rollout, units, draws, generator, is_sampling_policy):
        if not self.crn:
            draws = self.prepare(rollout, units, generator)
        return super().old_logp(model_old, rollout, units, draws, generator, is_sampling_policy)
