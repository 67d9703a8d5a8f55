"""Coefficient-preserving SDE rollouts (Flow-CPS, arXiv 2509.05952): Flow-GRPO's `sde_type=cps` step; its log-prob
is the full Gaussian unless `logp=squared_error` (Flow-GRPO's own value)."""
from __future__ import annotations

import torch

from bench.core.schema import Option
from samplers import SAMPLERS
from samplers.base import ChainSampler
from samplers.kernels import CPSSDE


@SAMPLERS.register("cps_sde")
class CPSSampler(ChainSampler):
    """Flow-CPS: SDE steps that keep x_t's noise coefficient exact; the final step to t = 0 is an ODE step."""

    OPTIONS = {"noise_level": Option(0.7, float, low=0, low_open=True, high=1,
                                     help="transition std = t_next sin(noise_level pi / 2)"),
               "logp": Option("gaussian", str, choices=CPSSDE.LOGPS,
                              help="gaussian: the transition density; squared_error: -(x' - mu)^2, Flow-GRPO's "
                                   "sde_type=cps value (no variance term)")}
    stochastic = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.kernel = CPSSDE(self.cfg["noise_level"], self.cfg["logp"])

    def sde_steps(self, iteration: int) -> torch.Tensor:
        # CPS's transition std is sigma' sin(a pi/2): zero on a step into t = 0, where no density exists.
        return super().sde_steps(iteration) & (self.schedule()[1:] > 0)
