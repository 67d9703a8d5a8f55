"""Flow-GRPO's SDE rollouts (Liu et al. 2025, arXiv 2505.05470)."""
from bench.core.schema import Option
from samplers import SAMPLERS
from samplers.base import ChainSampler
from samplers.kernels import FlowSDE


@SAMPLERS.register("flow_sde")
class FlowSDESampler(ChainSampler):
    """Flow-GRPO: SDE steps with noise level a (default 0.7), optionally only inside `sde_window`."""

    OPTIONS = {"noise_level": Option(0.7, float, low=0, low_open=True, help="Flow-GRPO's noise level a")}
    stochastic = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.kernel = FlowSDE(self.cfg["noise_level"])
