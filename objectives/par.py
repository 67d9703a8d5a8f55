"""PAR, the policy-advantage regression objective (arXiv 2602.04663)."""
from __future__ import annotations

import torch

from objectives import OBJECTIVES
from objectives.base import Objective, ratio_stats


@OBJECTIVES.register("par")
class PAR(Objective):
    """ELBO paper's PAR: mean(0.5 sg(r) (A - (logp_theta - logp_old))^2), regressing the log-ratio onto A.

    Its gradient, -sg(r) (A - log r) grad logp_theta, is PEPG's; the loss value differs (bounded below by 0),
    which is what clipping-free training monitors.
    """

    def loss(self, logp, logp_old, adv):
        log_r = logp - logp_old
        rho = torch.exp(log_r).detach()
        loss = (0.5 * rho * (adv - log_r) ** 2).mean()
        return loss, ratio_stats(logp, logp_old)
