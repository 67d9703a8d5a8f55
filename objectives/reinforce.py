"""REINFORCE (Williams 1992) on the estimator's log-likelihood."""
from __future__ import annotations

from objectives import OBJECTIVES
from objectives.base import Objective, ratio_stats


@OBJECTIVES.register("reinforce")
class Reinforce(Objective):
    """Williams 1992: -mean(A logp_theta), no importance weight."""

    def loss(self, logp, logp_old, adv):
        return -(adv * logp).mean(), ratio_stats(logp, logp_old)
