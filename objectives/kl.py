"""KL regularisers towards the reference policy (velocity space, as Flow-GRPO's KL term)."""
from __future__ import annotations

import torch

from bench.policy import PolicyCall
from estimators.base import Estimate


def velocity_kl(estimate: Estimate, model_ref: PolicyCall) -> torch.Tensor:
    """mean ||v_theta - v_ref||^2 at the inputs the estimator evaluated; zero at the reference."""
    with torch.no_grad():
        v_ref = model_ref(estimate.x_in, estimate.t_in, estimate.cond_in)
    return ((estimate.v - v_ref) ** 2).flatten(1).mean(1).mean()
