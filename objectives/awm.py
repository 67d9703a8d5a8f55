"""Advantage Weighted Matching (AWM, arXiv 2509.25050)."""
from __future__ import annotations

from bench.core.schema import Option
from objectives import OBJECTIVES
from objectives.base import Objective
from objectives.matching import MATCHING_WEIGHTINGS, matching_error, per_unit


@OBJECTIVES.register("awm")
class AWM(Objective):
    """AWM (Xue et al. 2025): mean(A * flow-matching loss) on the noised final samples, the pretraining loss
    reweighted by the advantage. Options: `weighting` (uniform | t | adaptive, see objectives.matching).

    On an ELBO estimator with the same weighting this is REINFORCE on that ELBO; its own weighting is kept
    separate so the estimator's J/timestep/noising options can vary underneath it.
    """

    OPTIONS = {"weighting": Option("uniform", str, choices=MATCHING_WEIGHTINGS)}
    on_noised_samples = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.weighting = self.cfg["weighting"]

    def sample_loss(self, est, x0, adv, model_old):
        err = per_unit(matching_error(est, x0, est.v, self.weighting), est, len(x0))
        loss = (adv * err).mean()
        # AWM needs no old policy; evaluating one only for a statistic would cost metered forwards.
        return loss, {"matching_error": err.detach().mean().item()}
