"""Final-sample ELBO likelihood (Rethinking the Design Space of RL for Diffusion Models, arXiv 2602.04663)."""
from __future__ import annotations

import math

import torch

from bench.core.errors import UserError
from bench.core.families import FLOW, ModelFamily
from bench.core.policy import index_cond
from bench.core.schema import Option
from estimators import ESTIMATORS
from estimators.base import Estimate, Estimator
from samplers.base import randn

TIME_SOURCES = ("grid", "uniform", "logit_normal")
WEIGHTINGS = ("uniform", "adaptive", "t", "exact", "x0", "ghuber")
NOISINGS = ("fresh", "trajectory")


def ghuber(err: torch.Tensor, t: torch.Tensor, power: float) -> torch.Tensor:
    """AWM's generalised-Huber weighting of a per-draw squared error e: ((e + 1e-10)^p - 1e-10^p) t / p; it grows
    like e^p, so outlying draws weigh less than under the plain error (scxue/advantage_weighted_matching)."""
    return ((err + 1e-10) ** power - 1e-10**power) * t / power


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

    OPTIONS = {
        "J": Option(4, int, low=1, help="noisings per sample"),
        "weighting": Option("uniform", str, choices=WEIGHTINGS),
        "weight_floor": Option(0.05, float, low=0, help="lower bound on the exact weight (1 - t) / t"),
        "timesteps": Option("uniform", str, choices=TIME_SOURCES),
        "time_fraction": Option(1.0, float, low=0, low_open=True, high=1, help="least-noisy fraction of times kept"),
        "noising": Option("fresh", str, choices=NOISINGS),
        "crn": Option(True, bool, help="the old policy reuses the (t, eps) draws"),
        "beta": Option(1.0, float, low=0, low_open=True, help="scale on the ELBO before it enters a ratio"),
        "t_min": Option(0.02, float, low=0, high=1, high_open=True),
        "t_max": Option(0.98, float, low=0, low_open=True, high=1),
        "ghuber_power": Option(0.25, float, low=0, low_open=True, high=1,
                               help="weighting=ghuber: AWM's ((e + 1e-10)^p - 1e-10^p) t / p of the per-draw error e"),
        "divide_by_guidance": Option(False, bool, help="ELBO repo under training CFG G: adaptive / G, uniform / G^2"),
        "grid_draws": Option("with_replacement", str, choices=("with_replacement", "without_replacement"),
                             help="timesteps=grid: independent draws, or J distinct grid steps per sample "
                                  "(DiffusionNFT, the ELBO repo)"),
        "per_draw": Option(False, bool, help="one action unit (and ratio) per draw, not per sample (ELBO repo, AWM's "
                                             "exp_first): J copies of each sample as units, one draw each"),
    }
    final_sample = True
    noised_samples = True

    def __init__(self, cfg):
        super().__init__(cfg)
        # Per-draw units: each sample is J units with one draw each, so every draw gets its own ratio.
        self.copies = int(self.cfg["J"]) if self.cfg["per_draw"] else 1
        self.J = 1 if self.cfg["per_draw"] else int(self.cfg["J"])
        self.ghuber_power = float(self.cfg["ghuber_power"])
        self.grid_draws = str(self.cfg["grid_draws"])
        self.divide_by_guidance = bool(self.cfg["divide_by_guidance"])
        self.weighting = self.cfg["weighting"]
        self.time_source = self.cfg["timesteps"]
        self.crn = bool(self.cfg["crn"])
        self.beta = float(self.cfg["beta"])
        self.t_min, self.t_max = float(self.cfg["t_min"]), float(self.cfg["t_max"])
        self.weight_floor = float(self.cfg["weight_floor"])
        self.time_fraction = float(self.cfg["time_fraction"])
        self.noising = self.cfg["noising"]
        if self.noising == "trajectory" and self.time_source != "grid":
            raise UserError(f"estimator.noising=trajectory: needs the rollout's grid times; valid: "
                            f"estimator.timesteps=grid (got {self.time_source})")
        if not self.t_min < self.t_max:
            raise UserError(f"estimator.t_min={self.t_min}: must be below estimator.t_max={self.t_max}; valid: t_min < t_max")

    def units(self, rollout):
        return rollout.leaves.repeat_interleave(self.copies)

    def _draw_times(self, n: int, schedule: torch.Tensor, generator: torch.Generator
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(t, 1 / q(t), grid step index or None) for n draws from the kept part of the time range."""
        if self.time_source == "grid":
            grid = schedule.cpu()
            steps = len(grid) - 1  # the noisy times are grid[:-1]; t = 0 carries no signal
            keep = max(1, round(self.time_fraction * steps))
            k = steps - keep + self._grid_indices(n, keep, generator)
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

    def _grid_indices(self, n: int, keep: int, generator: torch.Generator) -> torch.Tensor:
        """n indices into the kept grid steps: independent uniform draws, or (without_replacement) distinct steps
        for each sample's J draws, as DiffusionNFT and the ELBO repo take a random permutation of the grid per
        sample (a sample's J draws, or its J per-draw units, are consecutive)."""
        if self.grid_draws == "with_replacement":
            return torch.randint(keep, (n,), generator=generator)
        m = self.J * self.copies
        if m > keep or n % m:
            raise UserError(f"estimator.grid_draws=without_replacement: {m} distinct draws per sample from {keep} "
                            f"grid steps; valid: J <= {keep} (steps x time_fraction)")
        return torch.rand(n // m, keep, generator=generator).argsort(1)[:, :m].reshape(-1)

    def _time_weight(self, t: torch.Tensor, inv_density: torch.Tensor, family: ModelFamily = FLOW) -> torch.Tensor:
        if self.weighting == "t":
            return t
        if self.weighting == "x0":
            return t**2  # flows: |x0_hat - x0|^2 = t^2 |v - (eps - x0)|^2, the ELBO repo's `t` (x0-space) weighting
        if self.weighting == "exact":
            # The family's continuous-time ELBO weight on its output error: (1 - t) / t for flows.
            return family.elbo_weight(t).clamp_min(self.weight_floor) * inv_density
        return torch.ones_like(t)

    def prepare(self, rollout, units, generator):
        u, shape, device = len(units), rollout.x.shape[1:], rollout.x.device
        t, inv_density, k = self._draw_times(u * self.J, rollout.schedule, generator)
        w = self._time_weight(t, inv_density, rollout.family).view(u, self.J).to(device)
        t = t.view(u, self.J).to(device)
        if self.noising == "trajectory":
            nodes = rollout.path_nodes(units).gather(1, k.view(u, self.J).to(device))
            if bool((nodes < 0).any()):
                raise ValueError("ELBO noising=trajectory needs a rollout node at every grid step; "
                                 "this sampler skips some")
            x0, t_b = rollout.x[units].unsqueeze(1), t.view(u, self.J, *[1] * len(shape))
            # The noise that makes alpha_t x0 + sigma_t eps the stored node, so estimate() needs no special case.
            alpha, sigma = rollout.family.alpha_sigma(t_b)
            eps = (rollout.x[nodes] - alpha * x0) / sigma
        else:
            eps = randn((u, self.J, *shape), generator, device)
        return {"t": t, "eps": eps, "w": w}

    def estimate(self, model, rollout, units, draws):
        u, j = len(units), self.J
        x0 = rollout.x[units].unsqueeze(1)                    # [U, 1, *S]
        t = draws["t"].reshape(u, j, *[1] * (x0.ndim - 2))    # [U, J, 1..]
        eps, family = draws["eps"], rollout.family
        x_t = family.noise(x0, eps, t).flatten(0, 1)
        t_flat = draws["t"].reshape(-1)
        rep = torch.arange(u, device=units.device).repeat_interleave(j)
        cond = index_cond(rollout.node_cond(units), rep)
        v = model(x_t, t_flat, cond)
        if self.weighting != "adaptive":
            err = (v - family.target(x0, eps, t).flatten(0, 1)) ** 2  # uniform, t and exact differ only in draws["w"]
        else:
            x0_hat = family.x0_eps(x_t, v, t_flat)[0]
            diff = x0_hat - x0.expand_as(eps).flatten(0, 1)
            # Adaptive weight of DiffusionNFT/the ELBO paper: normalise by the stop-gradient mean error.
            norm = diff.abs().flatten(1).mean(1).detach().clamp_min(1e-6)
            err = diff**2 / norm.view(-1, *[1] * (diff.ndim - 1))
        per_draw = err.flatten(1).mean(1) if self.reduce == "mean" else err.flatten(1).sum(1)
        if self.weighting == "ghuber":
            per_draw = ghuber(per_draw, t_flat, self.ghuber_power)
        elbo = -(draws["w"].reshape(-1) * per_draw).view(u, j).mean(1)
        return Estimate(self.beta * elbo / self.guidance_divisor(rollout.guidance), v, x_t, t_flat, cond, rep)

    def guidance_divisor(self, guidance: float) -> float:
        """The ELBO repo's CFG normalisation: the guided error grows like G (adaptive) or G^2 (uniform)."""
        if not self.divide_by_guidance:
            return 1.0
        return {"adaptive": guidance, "uniform": guidance**2}.get(self.weighting, 1.0)

    def old_logp(self, model_old, rollout, units, draws, generator, is_sampling_policy):
        if not self.crn:
            draws = self.prepare(rollout, units, generator)
        return super().old_logp(model_old, rollout, units, draws, generator, is_sampling_policy)
