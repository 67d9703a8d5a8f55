"""Final-sample ELBO likelihood (Rethinking the Design Space of RL for Diffusion Models, arXiv 2602.04663)."""
from __future__ import annotations

import math

import torch

from bench.policy import index_cond
from estimators import ESTIMATORS
from estimators.base import Estimate, Estimator
from samplers.base import randn

TIME_SOURCES = ("grid", "uniform", "logit_normal")
WEIGHTINGS = ("uniform", "adaptive", "t", "exact")
NOISINGS = ("fresh", "trajectory")


@ESTIMATORS.register("elbo")
class ELBOEstimator(Estimator):
    """beta * ELBO(x0) from J noisings x_t = (1-t) x0 + t eps, with common random numbers for the old policy.

    Options: `J`, `weighting` of each draw's error e = |v - (eps - x0)|^2 (uniform: e; t: t e, AWM's t weighting;
    exact: max((1 - t) / t, weight_floor) e / q(t), the continuous-time ELBO weight divided by the density q the
    times are drawn from, so that with reduce=sum the ELBO is a Monte Carlo estimate in nats up to a constant;
    adaptive: |x0_hat - x0|^2 / sg(|x0_hat - x0|)), `timesteps` (grid: the sampler's times; uniform; logit_normal),
    `time_fraction` (keep the least noisy fraction of the times: drops the noisiest prefix of the trajectory),
    `noising` (fresh: new eps; trajectory: the rollout's own node at a grid time, with the eps it implies),
    `crn` (old policy reuses the draws), `beta`, `t_min`/`t_max` clamp for the continuous sources.
    """

    final_sample = True
    noised_samples = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.J = int(self.cfg.get("J", 4))
        self.weighting = self.cfg.get("weighting", "uniform")
        self.time_source = self.cfg.get("timesteps", "uniform")
        self.crn = bool(self.cfg.get("crn", True))
        self.beta = float(self.cfg.get("beta", 1.0))
        self.t_min, self.t_max = float(self.cfg.get("t_min", 0.02)), float(self.cfg.get("t_max", 0.98))
        self.weight_floor = float(self.cfg.get("weight_floor", 0.05))
        self.time_fraction = float(self.cfg.get("time_fraction", 1.0))
        self.noising = self.cfg.get("noising", "fresh")
        if not 0 < self.time_fraction <= 1:
            raise ValueError(f"ELBO time_fraction must be in (0, 1], got {self.time_fraction}")
        if self.noising not in NOISINGS:
            raise ValueError(f"unknown ELBO noising '{self.noising}'; valid: {', '.join(NOISINGS)}")
        if self.noising == "trajectory" and self.time_source != "grid":
            raise ValueError("ELBO noising=trajectory reuses the rollout's nodes, which sit on the sampler grid; "
                             f"set timesteps=grid (got '{self.time_source}')")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"unknown ELBO weighting '{self.weighting}'; valid: {', '.join(WEIGHTINGS)}")
        if self.time_source not in TIME_SOURCES:
            raise ValueError(f"unknown ELBO timesteps '{self.time_source}'; valid: {', '.join(TIME_SOURCES)}")
        if self.J < 1:
            raise ValueError(f"ELBO J must be >= 1, got {self.J}")

    def units(self, rollout):
        return rollout.leaves

    def _draw_times(self, n: int, schedule: torch.Tensor, generator: torch.Generator
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(t, 1 / q(t), grid step index or None) for n draws from the kept part of the time range."""
        if self.time_source == "grid":
            grid = schedule.cpu()
            steps = len(grid) - 1  # the noisy times are grid[:-1]; t = 0 carries no signal
            keep = max(1, round(self.time_fraction * steps))
            k = steps - keep + torch.randint(keep, (n,), generator=generator)
            # Uniform over the kept steps, each standing for its cell [t_{k+1}, t_k]: a Riemann sum over time.
            return grid[k], keep * (grid[k] - grid[k + 1]), k
        lo = self.t_min
        width = self.time_fraction * (self.t_max - self.t_min)
        if self.time_source == "uniform":
            u = torch.rand(n, generator=generator)
            return lo + width * u, torch.full((n,), width), None
        z = torch.randn(n, generator=generator)
        u = torch.sigmoid(z)
        normal_pdf = torch.exp(-0.5 * z**2) / math.sqrt(2 * math.pi)
        return lo + width * u, width * u * (1 - u) / normal_pdf, None

    def _time_weight(self, t: torch.Tensor, inv_density: torch.Tensor) -> torch.Tensor:
        if self.weighting == "t":
            return t
        if self.weighting == "exact":
            return ((1 - t) / t).clamp_min(self.weight_floor) * inv_density
        return torch.ones_like(t)

    def prepare(self, rollout, units, generator):
        u, shape, device = len(units), rollout.x.shape[1:], rollout.x.device
        t, inv_density, k = self._draw_times(u * self.J, rollout.schedule, generator)
        w = self._time_weight(t, inv_density).view(u, self.J).to(device)
        t = t.view(u, self.J).to(device)
        if self.noising == "trajectory":
            nodes = rollout.path_nodes(units).gather(1, k.view(u, self.J).to(device))
            if bool((nodes < 0).any()):
                raise ValueError("ELBO noising=trajectory needs a rollout node at every grid step; "
                                 "this sampler skips some")
            x0, t_b = rollout.x[units].unsqueeze(1), t.view(u, self.J, *[1] * len(shape))
            # The noise that makes (1 - t) x0 + t eps the stored node, so estimate() needs no special case.
            eps = (rollout.x[nodes] - (1 - t_b) * x0) / t_b
        else:
            eps = randn((u, self.J, *shape), generator, device)
        return {"t": t, "eps": eps, "w": w}

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
        if self.weighting != "adaptive":
            err = (v - (eps - x0).flatten(0, 1)) ** 2  # uniform, t and exact differ only in draws["w"]
        else:
            x0_hat = x_t - t_flat.view(-1, *[1] * (x_t.ndim - 1)) * v
            diff = x0_hat - x0.expand_as(eps).flatten(0, 1)
            # Adaptive weight of DiffusionNFT/the ELBO paper: normalise by the stop-gradient mean error.
            norm = diff.abs().flatten(1).mean(1).detach().clamp_min(1e-6)
            err = diff**2 / norm.view(-1, *[1] * (diff.ndim - 1))
        per_draw = err.flatten(1).mean(1) if self.reduce == "mean" else err.flatten(1).sum(1)
        elbo = -(draws["w"].reshape(-1) * per_draw).view(u, j).mean(1)
        return Estimate(self.beta * elbo, v, x_t, t_flat, cond, rep)

    def old_logp(self, model_old, rollout, units, draws, generator, is_sampling_policy):
        if not self.crn:
            draws = self.prepare(rollout, units, generator)
        return super().old_logp(model_old, rollout, units, draws, generator, is_sampling_policy)
