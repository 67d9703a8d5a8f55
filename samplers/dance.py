"""DanceGRPO's rollouts (Xue et al. 2025, arXiv 2505.07818)."""
from samplers import SAMPLERS
from samplers.base import ChainSampler
from samplers.kernels import DanceSDE


@SAMPLERS.register("dance")
class DanceSampler(ChainSampler):
    """DanceGRPO: Dance-SDE steps (eta 0.3), one initial noise per group, a random 60% of the steps trained per chain."""

    stochastic = True

    def __init__(self, cfg):
        # DanceGRPO's defaults unless the config says otherwise; the ChainSampler options do the work.
        super().__init__({"shared_noise": True, "train_fraction": 0.6, **dict(cfg)})
        self.kernel = DanceSDE(self.cfg.get("eta", 0.3))
