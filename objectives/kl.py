"""KL regularisers towards the reference policy: velocity space, or (stepwise) between transition Gaussians."""
from __future__ import annotations

import torch

from bench.core.errors import UnknownChoice, UserError
from bench.core.policy import PolicyCall
from estimators.base import Estimate
from samplers.rollout import SDE, Rollout


def velocity_kl(estimate: Estimate, model_ref: PolicyCall) -> torch.Tensor:
    """mean ||v_theta - v_ref||^2 at the inputs the estimator evaluated; zero at the reference."""
    with torch.no_grad():
        v_ref = model_ref(estimate.x_in, estimate.t_in, estimate.cond_in)
    return ((estimate.v - v_ref) ** 2).flatten(1).mean(1).mean()


def _edge_means(estimate: Estimate, model_ref: PolicyCall, rollout: Rollout, units: torch.Tensor, kind: str
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mu_theta, mu_ref, child ids) of the SDE edges the estimator evaluated, from the rollout's kernel."""
    child = units[estimate.unit_of_eval]
    if not bool((rollout.kind[child] == SDE).all()):
        raise UserError(f"train.kl_type={kind} needs SDE edges as units (estimator stepwise); use kl_type=velocity")
    with torch.no_grad():
        v_ref = model_ref(estimate.x_in, estimate.t_in, estimate.cond_in)
    t_next = rollout.t[child]
    mu, _ = rollout.kernel.mean_scale(estimate.x_in, estimate.v, estimate.t_in, t_next, rollout.schedule)
    mu_ref, _ = rollout.kernel.mean_scale(estimate.x_in, v_ref, estimate.t_in, t_next, rollout.schedule)
    return mu, mu_ref, child


def _scaled_gap(mu: torch.Tensor, mu_ref: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """mean over edges of mean_dims (mu - mu_ref)^2 / (2 std^2)."""
    s2 = std.reshape(-1, *[1] * (mu.ndim - 1)) ** 2
    return ((mu - mu_ref) ** 2 / (2 * s2)).flatten(1).mean(1).mean()


def transition_kl(estimate: Estimate, model_ref: PolicyCall, rollout: Rollout, units: torch.Tensor) -> torch.Tensor:
    """The exact stepwise KL: mean over edges of KL(N(mu_theta, s^2) || N(mu_ref, s^2)), per dimension
    |mu_theta - mu_ref|^2 / (2 s^2) averaged over dims, s the edge's transition scale."""
    mu, mu_ref, child = _edge_means(estimate, model_ref, rollout, units, "transition")
    return _scaled_gap(mu, mu_ref, rollout.scale[child])


def transition_kl_dt(estimate: Estimate, model_ref: PolicyCall, rollout: Rollout, units: torch.Tensor) -> torch.Tensor:
    """Flow-GRPO's stepwise KL term: mean over edges of mean_dims (mu_theta - mu_ref)^2 / (2 std_dev_t^2), with
    std_dev_t the kernel's std before its sqrt(-dt) factor (`kernel.kl_std`). For the Flow-SDE that is the exact
    Gaussian KL times |dt| (4x-28x smaller at T = 10); for CPS, whose std has no sqrt(-dt), the exact KL."""
    mu, mu_ref, child = _edge_means(estimate, model_ref, rollout, units, "transition_dt")
    return _scaled_gap(mu, mu_ref, rollout.kernel.kl_std(estimate.t_in, rollout.t[child], rollout.schedule))


KL_TYPES = ("velocity", "transition", "transition_dt")


def kl_penalty(kind: str, estimate: Estimate, model_ref: PolicyCall, rollout: Rollout,
               units: torch.Tensor) -> torch.Tensor:
    """The KL to the reference named by train.kl_type: velocity (any estimator), transition (exact Gaussian KL of
    the SDE edges) or transition_dt (Flow-GRPO's form of it; both stepwise only)."""
    if kind == "velocity":
        return velocity_kl(estimate, model_ref)
    if kind == "transition":
        return transition_kl(estimate, model_ref, rollout, units)
    if kind == "transition_dt":
        return transition_kl_dt(estimate, model_ref, rollout, units)
    raise UnknownChoice("train.kl_type", kind, list(KL_TYPES))
