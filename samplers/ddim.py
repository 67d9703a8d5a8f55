"""DDIM rollouts with noise eta (Song et al. 2021); eta = 1 with per-step log-probs is DDPO's sampler (arXiv 2305.13301)."""
from __future__ import annotations

import torch

from bench.core.families import FLOW
from bench.core.schema import Option
from samplers import SAMPLERS
from samplers.base import ChainSampler
from samplers.ddim_kernel import DDIMKernel


@SAMPLERS.register("ddim")
class DDIMSampler(ChainSampler):
    """DDIM chains: the DDIM step with noise `eta` on the `sde_window` steps, deterministic DDIM elsewhere.

    On a VP world the time grid is DDIMScheduler's timesteps; on a flow world the flow grid. A step whose DDIM
    std is zero (into clean data) stays deterministic. eta = 0 everywhere is the ODE sampler on VP worlds.
    """

    OPTIONS = {
        "eta": Option(1.0, float, low=0.0, help="DDIM eta: 0 deterministic (DDIM), 1 DDPM posterior (DDPO)"),
        "kernel": Option("ddim", str, choices=("ddim",),
                         help="its SDE kernel, always DDIM: lets a grid set sampler.kernel=ddim across ddim, tree, mix"),
    }

    def __init__(self, cfg):
        super().__init__(cfg)
        self.kernel = DDIMKernel(float(self.cfg.get("eta", 1.0)))
        self.stochastic = self.kernel.stochastic

    def plan(self, iteration, generator, family=FLOW):
        sched, sde = super().plan(iteration, generator, family)
        std = self.kernel.bind(family).coefficients(sched[:-1], sched[1:])[2]
        return sched, sde & (std > 0)
