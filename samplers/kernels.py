"""Transition kernels: the Gaussian step x' ~ N(mu(x, v), s^2 I) of each SDE, and the ODE step."""
from __future__ import annotations

import math

import torch

from bench.core.errors import UnknownChoice
from bench.core.families import FLOW, ModelFamily, require_flow
from bench.core.schema import Option
from samplers.ddim_kernel import DDIMKernel


def _bcast(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return a.reshape(a.shape + (1,) * (x.ndim - a.ndim))


class EulerODE:
    """Deterministic step of the probability-flow ODE: Euler x' = x + dt v on flows, DDIM (eta 0) on VP models."""

    stochastic = False

    def __init__(self, family: ModelFamily = FLOW):
        self.family = family

    def bind(self, family: ModelFamily) -> "EulerODE":
        """This step on `family`'s model."""
        return self if family is self.family else EulerODE(family)

    def mean_scale(self, x, v, sigma, sigma_next, schedule=None):
        return self.family.ode_step(x, v, sigma, sigma_next), torch.zeros_like(sigma)


class FlowOnly:
    """A kernel written in flow-matching time and velocity: it runs on flow models only."""

    families = ("flow",)

    def bind(self, family: ModelFamily) -> "FlowOnly":
        """Itself on a flow model; a one-line error naming the VP alternative otherwise."""
        require_flow(family, f"the {type(self).__name__} kernel", "sampler=ddim, or kernel=ddim")
        return self


class FlowSDE(FlowOnly):
    """Flow-GRPO's SDE (Liu et al. 2025, arXiv 2505.05470), noise level a."""

    stochastic = True

    def __init__(self, noise_level: float = 0.7):
        self.noise_level = float(noise_level)

    def logp(self, x: torch.Tensor, mu: torch.Tensor, scale: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
        return gaussian_logp(x, mu, scale, reduce)

    def kl_std(self, sigma: torch.Tensor, sigma_next: torch.Tensor, schedule: torch.Tensor) -> torch.Tensor:
        """Flow-GRPO's `std_dev_t`, the std before the sqrt(-dt) factor: its KL divides by 2 std_dev_t^2."""
        return self.std(sigma, schedule)

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
    return reduce_dims(elem, reduce)


def squared_error_logp(x: torch.Tensor, mu: torch.Tensor, scale: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
    """-(x - mu)^2 reduced over non-batch dims: Flow-GRPO's `sde_type=cps` log-prob, without the 1 / (2 s^2)
    factor and the normaliser. Its log-ratios are the Gaussian's times 2 s^2 (the log s terms cancel in a ratio)."""
    return reduce_dims(-((x - mu) ** 2), reduce)


def reduce_dims(elem: torch.Tensor, reduce: str) -> torch.Tensor:
    """Per-sample mean or sum over the non-batch dims."""
    elem = elem.flatten(1)
    if reduce == "mean":
        return elem.mean(1)
    if reduce == "sum":
        return elem.sum(1)
    raise ValueError(f"unknown reduce '{reduce}'; valid: mean, sum")


class DanceSDE(FlowOnly):
    """DanceGRPO's SDE (Xue et al. 2025, arXiv 2505.07818), noise level eta: the score comes from x0_hat = x - sigma v."""

    stochastic = True

    def __init__(self, eta: float = 0.3):
        self.eta = float(eta)

    def logp(self, x: torch.Tensor, mu: torch.Tensor, scale: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
        return gaussian_logp(x, mu, scale, reduce)

    def kl_std(self, sigma: torch.Tensor, sigma_next: torch.Tensor, schedule: torch.Tensor) -> torch.Tensor:
        """eta, the std before sqrt(-dt) (DanceGRPO has no KL; this mirrors Flow-GRPO's form)."""
        return torch.full_like(sigma, self.eta)

    def mean_scale(self, x, v, sigma, sigma_next, schedule=None):
        dt = sigma_next - sigma
        dt_b, sig_b = _bcast(dt, x), _bcast(sigma, x)
        x0_hat = x - sig_b * v
        score = -(x - (1 - sig_b) * x0_hat) / sig_b**2
        mu = x + dt_b * v - 0.5 * self.eta**2 * score * dt_b
        return mu, self.eta * torch.sqrt(-dt)


SDE_KERNELS = ("flow_sde", "dance_sde", "ddim")
# The options of samplers that take either SDE kernel by name (mix, tree).
KERNEL_OPTIONS = {
    "kernel": Option("flow_sde", str, choices=SDE_KERNELS, help="SDE of the stochastic steps"),
    "noise_level": Option(0.7, float, low=0, low_open=True, help="flow_sde noise level a"),
    "eta": Option(0.3, float, low=0, low_open=True, help="dance_sde noise level eta"),
    "ddim_eta": Option(1.0, float, low=0, low_open=True, help="ddim noise eta (1: DDPO's DDPM-posterior step)"),
}


def sde_kernel(cfg: dict) -> FlowSDE | DanceSDE | DDIMKernel:
    """The SDE kernel a sampler config names (`kernel`: flow_sde with `noise_level`, dance_sde with `eta`, or
    ddim with `ddim_eta`, the one for VP worlds)."""
    name = cfg.get("kernel", "flow_sde")
    if name == "flow_sde":
        return FlowSDE(cfg.get("noise_level", 0.7))
    if name == "dance_sde":
        return DanceSDE(cfg.get("eta", 0.3))
    if name == "ddim":
        return DDIMKernel(cfg.get("ddim_eta", 1.0))
    raise UnknownChoice("SDE kernel", name, list(SDE_KERNELS))


class CPSSDE(FlowOnly):
    """Flow-GRPO's coefficient-preserving SDE (Flow-CPS, Wang & Yu 2025, arXiv 2509.05952), noise level a.

    std = sigma' sin(a pi / 2); mu = (1 - sigma') x0_hat + sqrt(sigma'^2 - std^2) eps_hat with x0_hat = x - sigma v,
    eps_hat = x + (1 - sigma) v, so x' keeps the marginal coefficients (1 - sigma') on x0 and sigma' on noise.
    The scale is std itself (no sqrt(-dt)); it vanishes at sigma' = 0, so the last step must stay deterministic.
    `logp`: gaussian (the full transition density, the default: a density the fidelity lab can compare) or
    squared_error (Flow-GRPO's `sde_type=cps` value, -(x' - mu)^2 without the variance term).
    """

    stochastic = True
    LOGPS = ("gaussian", "squared_error")

    def __init__(self, noise_level: float = 0.7, logp: str = "gaussian"):
        self.noise_level = float(noise_level)
        if logp not in self.LOGPS:
            raise UnknownChoice("sampler.logp", logp, list(self.LOGPS))
        self.logp_form = logp

    def logp(self, x: torch.Tensor, mu: torch.Tensor, scale: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
        if self.logp_form == "squared_error":
            return squared_error_logp(x, mu, scale, reduce)
        return gaussian_logp(x, mu, scale, reduce)

    def kl_std(self, sigma: torch.Tensor, sigma_next: torch.Tensor, schedule: torch.Tensor) -> torch.Tensor:
        """Flow-GRPO's `std_dev_t` for cps: the transition std itself, so its KL form is the exact Gaussian KL."""
        return sigma_next * math.sin(self.noise_level * math.pi / 2)

    def mean_scale(self, x, v, sigma, sigma_next, schedule=None):
        std = sigma_next * math.sin(self.noise_level * math.pi / 2)
        sig_b, nxt_b, std_b = _bcast(sigma, x), _bcast(sigma_next, x), _bcast(std, x)
        x0_hat = x - sig_b * v
        eps_hat = x + (1 - sig_b) * v
        mu = (1 - nxt_b) * x0_hat + torch.sqrt((nxt_b**2 - std_b**2).clamp_min(0)) * eps_hat
        return mu, std


def transition_logp(kernel, x: torch.Tensor, mu: torch.Tensor, scale: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
    """The kernel's own log-prob of an SDE edge (CPS may drop the variance term); the Gaussian for kernels without one."""
    own = getattr(kernel, "logp", None)
    return own(x, mu, scale, reduce) if own is not None else gaussian_logp(x, mu, scale, reduce)
