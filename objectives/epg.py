"""Importance-weighted policy gradients EPG and PEPG (arXiv 2602.04663)."""
from __future__ import annotations

import torch

from objectives import OBJECTIVES
from objectives.base import Objective, ratio_stats


@OBJECTIVES.register("epg")
class EPG(Objective):
    """ELBO paper's EPG: -mean(sg(r) A logp_theta); unbounded below for A < 0, so keep steps per batch few."""

    def centred_advantage(self, adv, log_r):
        return adv

    def loss(self, logp, logp_old, adv):
        log_r = logp - logp_old
        rho = torch.exp(log_r).detach()
        loss = -(rho * self.centred_advantage(adv, log_r.detach()) * logp).mean()
        return loss, ratio_stats(logp, logp_old)


@OBJECTIVES.register("pepg")
class PEPG(EPG):
    """ELBO paper's PEPG: -mean(sg(r) (A - sg(log r)) logp_theta), a proximal correction of EPG."""

    def centred_advantage(self, adv, log_r):
        return adv - log_r
