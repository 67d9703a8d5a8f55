"""DanceGRPO's rollouts (Xue et al. 2025, arXiv 2505.07818)."""
from bench.core.schema import Option
from samplers import SAMPLERS
from samplers.base import ChainSampler
from samplers.kernels import DanceSDE


@SAMPLERS.register("dance")
class DanceSampler(ChainSampler):
    """DanceGRPO: Dance-SDE steps (eta 0.3), one initial noise per group, a random 60% of the steps trained per chain."""

    # DanceGRPO's defaults for the ChainSampler options: one noise per group, 60% of the steps trained.
    OPTIONS = {"eta": Option(0.3, float, low=0, low_open=True, help="Dance-SDE noise level"),
               "shared_noise": Option(True, bool, help="the group shares its initial noise (init_same_noise)"),
               "train_fraction": Option(0.6, float, low=0, low_open=True, high=1, help="DanceGRPO's timestep_fraction")}
    stochastic = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.kernel = DanceSDE(self.cfg["eta"])
