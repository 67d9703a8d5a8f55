"""Transition kernels: the Gaussian step x' ~ N(mu(x, v), s^2 I) of each SDE, and the ODE step."""
from __future__ import annotations

import math

import torch

from bench.errors import UnknownChoice


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


class DanceSDE:
    """DanceGRPO's SDE (Xue et al. 2025, arXiv 2505.07818), noise level eta: the score comes from x0_hat = x - sigma v."""

    stochastic = True

    def __init__(self, eta: float = 0.3):
        self.eta = float(eta)

    def mean_scale(self, x, v, sigma, sigma_next, schedule=None):
        dt = sigma_next - sigma
        dt_b, sig_b = _bcast(dt, x), _bcast(sigma, x)
        x0_hat = x - sig_b * v
        score = -(x - (1 - sig_b) * x0_hat) / sig_b**2
        mu = x + dt_b * v - 0.5 * self.eta**2 * score * dt_b
        return mu, self.eta * torch.sqrt(-dt)


SDE_KERNELS = ("flow_sde", "dance_sde")


def sde_kernel(cfg: dict) -> FlowSDE | DanceSDE:
    """The SDE kernel a sampler config names (`kernel`: flow_sde with `noise_level`, or dance_sde with `eta`)."""
    name = cfg.get("kernel", "flow_sde")
    if name == "flow_sde":
        return FlowSDE(cfg.get("noise_level", 0.7))
    if name == "dance_sde":
        return DanceSDE(cfg.get("eta", 0.3))
    raise UnknownChoice("SDE kernel", name, list(SDE_KERNELS))


class CPSSDE:
    """Flow-GRPO's coefficient-preserving SDE (Flow-CPS, Wang & Yu 2025, arXiv 2509.05952), noise level a.

    std = sigma' sin(a pi / 2); mu = (1 - sigma') x0_hat + sqrt(sigma'^2 - std^2) eps_hat with x0_hat = x - sigma v,
    eps_hat = x + (1 - sigma) v, so x' keeps the marginal coefficients (1 - sigma') on x0 and sigma' on noise.
    The scale is std itself (no sqrt(-dt)); it vanishes at sigma' = 0, so the last step must stay deterministic.
    """

    stochastic = True

    def __init__(self, noise_level: float = 0.7):
        self.noise_level = float(noise_level)

    def mean_scale(self, x, v, sigma, sigma_next, schedule=None):
        std = sigma_next * math.sin(self.noise_level * math.pi / 2)
        sig_b, nxt_b, std_b = _bcast(sigma, x), _bcast(sigma_next, x), _bcast(std, x)
        x0_hat = x - sig_b * v
        eps_hat = x + (1 - sig_b) * v
        mu = (1 - nxt_b) * x0_hat + torch.sqrt((nxt_b**2 - std_b**2).clamp_min(0)) * eps_hat
        return mu, std
