"""The objective interface: a loss from per-unit log-likelihoods and advantages."""
from __future__ import annotations

from typing import Any, Mapping

import torch

from bench.core.policy import PolicyCall
from bench.core.schema import Configurable
from estimators.base import Estimate


def ratio_stats(logp: torch.Tensor, logp_old: torch.Tensor) -> dict[str, float]:
    """Diagnostics of r = exp(logp - logp_old) logged every step."""
    with torch.no_grad():
        log_r = logp - logp_old
        r = log_r.exp()
        return {"ratio_mean": r.mean().item(), "ratio_min": r.min().item(), "ratio_max": r.max().item(),
                "approx_kl_old": (0.5 * log_r**2).mean().item()}


class Objective(Configurable):
    """Loss over action units: `loss(logp_theta, logp_old, A) -> (scalar, stats)`.

    Objectives that regress velocities on noised final samples instead of weighting a log-ratio (DiffusionNFT,
    AWM) set `on_noised_samples` and implement `sample_loss`: the estimator then only supplies the noisings
    x_t = (1 - t) x0 + t eps (its J, timesteps, time_fraction and noising options) and v_theta there.
    """

    GROUP = "objective"
    on_noised_samples: bool = False

    def __init__(self, cfg: Mapping[str, Any]):
        self.cfg = self.resolve_options(cfg)

    def incompatibility(self, sampler, estimator) -> str | None:
        """Why this objective cannot train with `estimator` on `sampler`, or None if it can."""
        if self.on_noised_samples and not estimator.noised_samples:
            return (f"objective '{self.cfg.get('name')}' regresses velocities on noised final samples; estimator "
                    f"'{estimator.cfg.get('name')}' provides none (use elbo)")
        return None

    def loss(self, logp: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def sample_loss(self, est: Estimate, x0: torch.Tensor, adv: torch.Tensor, model_old: PolicyCall | None
                    ) -> tuple[torch.Tensor, dict]:
        """Loss from v_theta at the estimator's noisings of the units' final samples x0 [U] with advantages [U];
        `model_old` evaluates the old policy there, None when it equals the current one (reuse est.v)."""
        raise NotImplementedError


def old_velocity(est: Estimate, model_old: PolicyCall | None) -> torch.Tensor:
    """v_old at the estimator's inputs: the current velocities detached when the old policy is the current one."""
    if model_old is None:
        return est.v.detach()
    with torch.no_grad():
        return model_old(est.x_in, est.t_in, est.cond_in)
