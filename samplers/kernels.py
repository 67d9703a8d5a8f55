"""Transition kernels: the Gaussian step x' ~ N(mu(x, v), s^2 I) of each SDE, and the ODE step."""
from __future__ import annotations

import math

import torch


def _bcast(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return a.reshape(a.shape + (1,) * (x.ndim - a.ndim))


class EulerODE:
    """Deterministic Euler step of the probability-flow ODE: x' = x + dt v."""

    stochastic = False

    def mean_scale(self, x, v, sigma, sigma_next, schedule=None):
        dt = _bcast(sigma_next - sigma, x)
        return x + dt * v, torch.zeros_like(sigma)


class FlowSDE:
    """Flow-GRPO's SDE (Liu et al. 2025, arXiv 2505.05470), noise level a."""

    stochastic = True

    def __init__(self, noise_level: float = 0.7):
        self.noise_level = float(noise_level)

    def std(self, sigma: torch.Tensor, schedule: torch.Tensor) -> torch.Tensor:
        # At sigma = 1 the formula is singular; Flow-GRPO uses the next grid time in the denominator.
        denom = 1 - torch.where(sigma >= 1.0, schedule[1].to(sigma), sigma)
        return self.noise_level * torch.sqrt(sigma / denom)

    def mean_scale(self, x, v, sigma, sigma_next, schedule):
        std = self.std(sigma, schedule)
        dt = sigma_next - sigma
        std_b, dt_b, sig_b = _bcast(std, x), _bcast(dt, x), _bcast(sigma, x)
        mu = x + dt_b * (v + std_b**2 / (2 * sig_b) * (x + (1 - sig_b) * v))
        return mu, std * torch.sqrt(-dt)


def gaussian_logp(x: torch.Tensor, mu: torch.Tensor, scale: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
    """log N(x; mu, scale^2 I) per sample, reduced over non-batch dims ('mean' as Flow-GRPO, or 'sum')."""
    s = _bcast(scale, x)
    elem = -((x - mu) ** 2) / (2 * s**2) - torch.log(s) - 0.5 * math.log(2 * math.pi)
    elem = elem.flatten(1)
    if reduce == "mean":
        return elem.mean(1)
    if reduce == "sum":
        return elem.sum(1)
    raise ValueError(f"unknown reduce '{reduce}'; valid: mean, sum")
