"""DDIM's Gaussian step with noise eta on any model family (Song et al. 2021, arXiv 2010.02502, eqs. 12 and 16)."""
from __future__ import annotations

import torch

from bench.core.families import FLOW, ModelFamily, _bcast


class DDIMKernel:
    """x' ~ N(alpha' x0_hat + sqrt(sigma'^2 - std^2) eps_hat, std^2 I), std = eta sigma' sqrt(1 - (alpha sigma')^2 / (alpha' sigma)^2).

    For VP models std is DDIM's sigma_t(eta) = eta sqrt((1 - abar') / (1 - abar)) sqrt(1 - abar / abar'): eta = 1 is
    the DDPM posterior (DDPO's sampler), eta = 0 the deterministic DDIM step. The same formula on a flow model
    (alpha = 1 - t, sigma = t) is the flow analogue. The scale is std itself; it vanishes on a step into clean
    data (alpha' = 1), so samplers keep such steps deterministic. Coefficients are computed in the times' dtype.
    """

    def __init__(self, eta: float = 1.0, family: ModelFamily = FLOW):
        self.eta, self.family = float(eta), family
        self.stochastic = self.eta > 0

    def bind(self, family: ModelFamily) -> "DDIMKernel":
        """This kernel on `family` (DDIM is defined for every family)."""
        return DDIMKernel(self.eta, family)

    def coefficients(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(alpha', sqrt(sigma'^2 - std^2), std) per sample, in the times' dtype (DDIMScheduler's order of operations)."""
        std = self.eta * self.family.ddim_variance(sigma, sigma_next) ** 0.5
        a2n, s2n = self.family.alpha2_sigma2(sigma_next)
        return a2n ** 0.5, (s2n - std**2).clamp_min(0) ** 0.5, std

    def kl_std(self, sigma: torch.Tensor, sigma_next: torch.Tensor, schedule: torch.Tensor) -> torch.Tensor:
        """The transition std itself (no sqrt(-dt) factor), as CPS: the KL form is the exact Gaussian KL."""
        return self.coefficients(sigma, sigma_next)[2].to(torch.as_tensor(sigma).dtype)

    def mean_scale(self, x, v, sigma, sigma_next, schedule=None):
        a_n, c_eps, std = self.coefficients(torch.as_tensor(sigma, dtype=x.dtype), torch.as_tensor(sigma_next, dtype=x.dtype))
        x0, eps = self.family.x0_eps(x, v, sigma)
        mu = _bcast(a_n.to(x.dtype), x) * x0 + _bcast(c_eps.to(x.dtype), x) * eps
        return mu, std.to(x.dtype)
