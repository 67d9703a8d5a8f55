"""Exact CNF log-likelihood of final samples under the probability-flow ODE: ground truth on the digits world."""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch.func import jvp, vmap

from bench.core.policy import Cond
from bench.core.schema import Option
from estimators import ESTIMATORS
from estimators.base import Estimate, Estimator

VelocityFn = Callable[[torch.Tensor, torch.Tensor, Cond], torch.Tensor]
METHODS = ("rk4", "euler")
DIVERGENCES = ("exact", "hutchinson")


def velocity_and_divergence(f: VelocityFn, x: torch.Tensor, t: torch.Tensor, cond: Cond,
                            probe: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """v = f(x, t, cond) and div_x v per sample: exact (one JVP per dimension, batched) or Hutchinson (FFJORD).

    probe: None for the exact trace, or [K, B, *shape] probes for the unbiased estimate mean_k probe_k^T J probe_k.
    """
    b, shape, d = x.shape[0], x.shape[1:], x[0].numel()
    if probe is None:
        tangents = torch.eye(d, dtype=x.dtype, device=x.device).view(d, 1, *shape).expand(d, b, *shape)
    else:
        tangents = probe

    def push(tangent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return jvp(lambda y: f(y, t, cond), (x,), (tangent,))

    # jacfwd's trick: vmap the JVP over tangents, so the primal forward runs once and the tangents share matmuls.
    v, jv = vmap(push, out_dims=(None, 0))(tangents)
    jv = jv.reshape(len(tangents), b, d)
    if probe is None:
        div = jv[torch.arange(d), :, torch.arange(d)].sum(0)  # sum_k dv_k / dx_k
    else:
        div = (tangents.reshape(len(tangents), b, d) * jv).sum(-1).mean(0)
    return v, div


def cnf_log_likelihood(f: VelocityFn, x0: torch.Tensor, cond: Cond, steps: int = 32, method: str = "rk4",
                       probe: torch.Tensor | None = None, t0: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(x0) in nats per sample, v(x0, t0)): FFJORD's (Grathwohl et al. 2019) instantaneous change of variables.

    With x_t = (1 - t) x0 + t eps and dx/dt = v, d log p_t(x_t)/dt = -div v, so integrating the ODE forwards
    from the sample at t = t0 (0 for flows) to noise at t = 1: log p_t0(x0) = log N(x1; 0, I) + int div v dt.
    """
    if method not in METHODS:
        raise ValueError(f"unknown integration method '{method}'; valid: {', '.join(METHODS)}")
    b, d = x0.shape[0], x0[0].numel()
    h = (1.0 - t0) / steps
    x, total = x0, torch.zeros(b, dtype=x0.dtype, device=x0.device)

    def field(y: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
        return velocity_and_divergence(f, y, torch.full((b,), t, dtype=x0.dtype, device=x0.device), cond, probe)

    v_first = None
    for i in range(steps):
        t = t0 + i * h
        k1, l1 = field(x, t)
        if v_first is None:
            v_first = k1
        if method == "euler":
            x, total = x + h * k1, total + h * l1
            continue
        k2, l2 = field(x + 0.5 * h * k1, t + 0.5 * h)
        k3, l3 = field(x + 0.5 * h * k2, t + 0.5 * h)
        k4, l4 = field(x + h * k3, t + h)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        total = total + h / 6 * (l1 + 2 * l2 + 2 * l3 + l4)
    log_prior = -0.5 * x.flatten(1).pow(2).sum(1) - 0.5 * d * math.log(2 * math.pi)
    return log_prior + total, v_first


@ESTIMATORS.register("exact")
class ExactEstimator(Estimator):
    """The CNF log-likelihood (FFJORD, arXiv 1810.01367) of each final sample under the model's ODE, for diagnostics.

    Options: `steps` (integration steps over t in [0, 1]), `method` (rk4 | euler), `divergence` (exact: the trace
    of the Jacobian; hutchinson: `probes` Rademacher probes, unbiased, fixed along the path), `reduce` (sum: nats;
    mean: nats per dimension). It carries no gradient, so training grids skip it with a reason.
    """

    OPTIONS = {
        "steps": Option(64, int, low=1, help="integration steps over t in [0, 1]"),
        "method": Option("euler", str, choices=tuple(METHODS)),
        "divergence": Option("exact", str, choices=tuple(DIVERGENCES)),
        "probes": Option(1, int, low=1, help="Hutchinson probes"),
        "reduce": Option("sum", str, choices=("mean", "sum"), help="sum: nats; mean: nats per dimension"),
    }
    final_sample = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.steps = int(self.cfg["steps"])
        self.method = self.cfg["method"]
        self.divergence = self.cfg["divergence"]
        self.probes = int(self.cfg["probes"])

    def incompatibility(self, sampler):
        return ("estimator 'exact' is a diagnostic (CNF log-likelihood without gradient); "
                "it runs in grid=estimator_fidelity, not in training")

    def units(self, rollout):
        return rollout.leaves

    def prepare(self, rollout, units, generator):
        if self.divergence == "exact":
            return {}
        shape = (len(units), self.probes, *rollout.x.shape[1:])
        signs = torch.randint(2, shape, generator=generator).to(rollout.x) * 2 - 1
        return {"probe": signs}

    def estimate(self, model, rollout, units, draws):
        x0, cond = rollout.x[units], rollout.node_cond(units)
        probe = draws["probe"].transpose(0, 1) if "probe" in draws else None
        family, start, f = rollout.family, 0.0, model
        if family.name != "flow":
            # A VP model's probability-flow ODE in its own time, from where its rollouts end (DDIM's last abar).
            start = float(rollout.schedule[-1])
            f = lambda y, t, c: family.ode_velocity(y, model(y, t, c), t)  # noqa: E731
        with torch.no_grad():
            logp, v0 = cnf_log_likelihood(f, x0, cond, self.steps, self.method, probe, start)
        if self.reduce == "mean":
            logp = logp / x0[0].numel()
        t0 = torch.full((len(units),), start, dtype=x0.dtype, device=x0.device)
        return Estimate(logp, v0, x0, t0, cond, torch.arange(len(units), device=x0.device))
