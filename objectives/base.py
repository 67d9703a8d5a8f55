"""The objective interface: a loss from per-unit log-likelihoods and advantages."""
from __future__ import annotations

from typing import Any, Mapping

import torch


def ratio_stats(logp: torch.Tensor, logp_old: torch.Tensor) -> dict[str, float]:
    """Diagnostics of r = exp(logp - logp_old) logged every step."""
    with torch.no_grad():
        log_r = logp - logp_old
        r = log_r.exp()
        return {"ratio_mean": r.mean().item(), "ratio_min": r.min().item(), "ratio_max": r.max().item(),
                "approx_kl_old": (0.5 * log_r**2).mean().item()}


class Objective:
    """Loss over action units: `loss(logp_theta, logp_old, A) -> (scalar, stats)`."""

    def __init__(self, cfg: Mapping[str, Any]):
        self.cfg = dict(cfg)

    def loss(self, logp: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError
