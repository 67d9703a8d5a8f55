"""The exact CNF log-likelihood: Gaussian closed form on a linear-velocity flow, Hutchinson's unbiasedness, and
convergence of the configured grid on the digits model."""
from __future__ import annotations

import math

import torch
from omegaconf import OmegaConf

from bench.runner.config import CONFIG_DIR
from bench.core.policy import Policy, PolicyCall
from estimators import ESTIMATORS
from estimators.exact import cnf_log_likelihood
from runner_helpers import digits_cache, results_dir  # noqa: F401 (session fixture: one digits cache)
from samplers import SAMPLERS

D = 64


class LinearFlow(Policy):
    """The exact velocity of x_t = (1 - t) x0 + t eps for x0 ~ N(0, Q diag(s^2) Q^T): v = Q diag(a(t)) Q^T x,
    a(t) = d/dt log sigma_t with sigma_t^2 = (1 - t)^2 s^2 + t^2, so every marginal is Gaussian."""

    def __init__(self, dtype=torch.float64):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        # Frozen parameters (not buffers): samplers find the device from the policy's parameters.
        q = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=dtype))[0]
        self.q = torch.nn.Parameter(q, requires_grad=False)
        self.s = torch.nn.Parameter(0.3 + torch.rand(D, generator=g, dtype=dtype), requires_grad=False)

    def velocity(self, x, t, cond):
        tb = t.to(x.dtype)[:, None]
        var = (1 - tb) ** 2 * self.s**2 + tb**2
        a = (tb - (1 - tb) * self.s**2) / var
        return ((x @ self.q) * a) @ self.q.T

    def log_density(self, x0: torch.Tensor) -> torch.Tensor:
        z = x0.double() @ self.q.double()
        s = self.s.double()
        return (-0.5 * (z / s) ** 2 - torch.log(s) - 0.5 * math.log(2 * math.pi)).sum(1)


def test_linear_flow_matches_the_gaussian_closed_form(meter):
    flow = LinearFlow()
    x0 = (torch.randn(6, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * flow.s) @ flow.q.T
    with meter.phase("eval"):
        logp, _ = cnf_log_likelihood(PolicyCall(flow, meter), x0, torch.zeros(6, dtype=torch.long), steps=32,
                                     method="rk4")
    assert (logp - flow.log_density(x0)).abs().max().item() < 1e-4


def test_registered_estimator_on_a_sampled_rollout(meter):
    # float32 end to end, as in use: samples drawn by the ODE sampler from the linear flow itself.
    flow = LinearFlow(torch.float32)
    model = PolicyCall(flow, meter)
    with meter.phase("eval"), torch.no_grad():
        r = SAMPLERS.get("ode")({"steps": 8}).sample(model, ["a"], torch.tensor([0]), 4, (D,),
                                                     torch.Generator().manual_seed(0))
        est = ESTIMATORS.get("exact")({"steps": 32, "method": "rk4", "reduce": "sum"})
        out = est.estimate(model, r, est.units(r), est.prepare(r, est.units(r), torch.Generator()))
    assert (out.logp.double() - flow.log_density(r.x0)).abs().max().item() < 1e-4
    assert est.incompatibility(SAMPLERS.get("ode")({})) is not None  # no gradient: never a training estimator


def test_hutchinson_is_unbiased_and_noisy(meter):
    flow, k = LinearFlow(), 256
    x0 = (torch.randn(2, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * flow.s) @ flow.q.T
    probes = torch.randint(2, (k, 2, D), generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2 - 1
    model, cond = PolicyCall(flow, meter), torch.zeros(2 * k, dtype=torch.long)
    with meter.phase("eval"):
        exact, _ = cnf_log_likelihood(model, x0, cond[:2], steps=8, method="rk4")
        averaged, _ = cnf_log_likelihood(model, x0, cond[:2], steps=8, method="rk4", probe=probes)
        # The same k probes one at a time (each sample repeated k times): k independent single-probe estimates.
        singles, _ = cnf_log_likelihood(model, x0.repeat(k, 1), cond, steps=8, method="rk4",
                                        probe=probes.reshape(1, 2 * k, D))
    singles = singles.view(k, 2)
    torch.testing.assert_close(averaged, singles.mean(0))
    # The rotated Jacobian is not diagonal, so a single probe is noisy (Rademacher is exact only on diagonals) ...
    assert (singles.std(0) > 1.0).all()
    # ... and the average is within 4 standard errors of the exact trace integral.
    assert ((averaged - exact).abs() < 4 * singles.std(0) / k**0.5).all()


def test_configured_grid_is_converged_on_digits(tmp_path, digits_cache, meter):
    from bench.runner.components import build_world
    from bench.runner.config import compose_config

    from bench.runner.resolve import resolve_cell

    cfg = resolve_cell(compose_config([f"results_dir={results_dir(tmp_path, digits_cache)}", "estimator=exact"]))
    exact_cfg = cfg.estimator  # the configured estimator: its declared defaults plus exact.yaml's overrides
    assert cfg.estimator.steps == ESTIMATORS.get("exact").options()["steps"].default
    world = build_world(cfg)
    model = PolicyCall(world.build_policy(), meter)
    prompts = ["a handwritten 3", "a handwritten 8", "the digit 0", "the digit 7"]
    cond = world.encode(prompts)
    with meter.phase("eval"), torch.no_grad():
        r = SAMPLERS.get("ode")({"steps": 10}).sample(model, prompts, cond, 1, (D,), torch.Generator().manual_seed(0))
        logp = {n: cnf_log_likelihood(model, r.x0, cond, n, exact_cfg["method"])[0]
                for n in (exact_cfg["steps"], 2 * exact_cfg["steps"])}
    change = (logp[exact_cfg["steps"]] - logp[2 * exact_cfg["steps"]]).abs().max().item() / D
    assert change < 1e-3, f"doubling {exact_cfg['steps']} steps moved log p by {change:.2e} nats/dim"
