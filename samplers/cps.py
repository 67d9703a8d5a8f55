"""Coefficient-preserving SDE rollouts (Flow-CPS, arXiv 2509.05952, as Flow-GRPO's `sde_type=cps`)."""
from __future__ import annotations

import torch

from samplers import SAMPLERS
from samplers.base import ChainSampler
from samplers.kernels import CPSSDE


@SAMPLERS.register("cps_sde")
class CPSSampler(ChainSampler):
    """Flow-CPS: SDE steps that keep x_t's noise coefficient exact; the final step to t = 0 is an ODE step."""

    stochastic = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.kernel = CPSSDE(self.cfg.get("noise_level", 0.7))

    def sde_steps(self, iteration: int) -> torch.Tensor:
        # CPS's transition std is sigma' sin(a pi/2): zero on a step into t = 0, where no density exists.
        return super().sde_steps(iteration) & (self.schedule()[1:] > 0)
