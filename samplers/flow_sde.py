"""Flow-GRPO's SDE rollouts (Liu et al. 2025, arXiv 2505.05470)."""
from samplers import SAMPLERS
from samplers.base import ChainSampler
from samplers.kernels import FlowSDE


@SAMPLERS.register("flow_sde")
class FlowSDESampler(ChainSampler):
    """Flow-GRPO: SDE steps with noise level a (default 0.7), optionally only inside `sde_window`."""

    stochastic = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.kernel = FlowSDE(self.cfg.get("noise_level", 0.7))
