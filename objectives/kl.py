"""KL regularisers towards the reference policy: velocity space, or (stepwise) between transition Gaussians."""
from __future__ import annotations

import torch

from bench.errors import UnknownChoice, UserError
from bench.policy import PolicyCall
from estimators.base import Estimate
from samplers.rollout import SDE, Rollout


def velocity_kl(estimate: Estimate, model_ref: PolicyCall) -> torch.Tensor:
    """mean ||v_theta - v_ref||^2 at the inputs the estimator evaluated; zero at the reference."""
    with torch.no_grad():
        v_ref = model_ref(estimate.x_in, estimate.t_in, estimate.cond_in)
    return ((estimate.v - v_ref) ** 2).flatten(1).mean(1).mean()


def transition_kl(estimate: Estimate, model_ref: PolicyCall, rollout: Rollout, units: torch.Tensor) -> torch.Tensor:
    """Flow-GRPO's stepwise KL: mean over edges of KL(N(mu_theta, s^2) || N(mu_ref, s^2)), per dimension
    |mu_theta - mu_ref|^2 / (2 s^2) averaged over dims; means from the rollout's kernel at each evaluated parent."""
    child = units[estimate.unit_of_eval]
    if not bool((rollout.kind[child] == SDE).all()):
        raise UserError("train.kl_type=transition needs SDE edges as units (estimator stepwise); use kl_type=velocity")
    with torch.no_grad():
        v_ref = model_ref(estimate.x_in, estimate.t_in, estimate.cond_in)
    t_next, scale = rollout.t[child], rollout.scale[child]
    mu, _ = rollout.kernel.mean_scale(estimate.x_in, estimate.v, estimate.t_in, t_next, rollout.schedule)
    mu_ref, _ = rollout.kernel.mean_scale(estimate.x_in, v_ref, estimate.t_in, t_next, rollout.schedule)
    s2 = scale.reshape(-1, *[1] * (mu.ndim - 1)) ** 2
    return ((mu - mu_ref) ** 2 / (2 * s2)).flatten(1).mean(1).mean()


KL_TYPES = ("velocity", "transition")


def kl_penalty(kind: str, estimate: Estimate, model_ref: PolicyCall, rollout: Rollout,
               units: torch.Tensor) -> torch.Tensor:
    """The KL to the reference named by train.kl_type: velocity (any estimator) or transition (stepwise)."""
    if kind == "velocity":
        return velocity_kl(estimate, model_ref)
    if kind == "transition":
        return transition_kl(estimate, model_ref, rollout, units)
    raise UnknownChoice("train.kl_type", kind, list(KL_TYPES))
