"""Deterministic ODE solvers for the non-stochastic steps: Euler, Heun, DPM-Solver++(2M) (DESIGN section 5).

A solver advances x from schedule[i] to schedule[i + 1] given v = model(x, schedule[i]), which the sampler has
already evaluated (and counted); a solver that needs more evaluations makes them through `model`, so the meter
sees every one. Solvers are created per rollout: multistep solvers keep the previous step's prediction.
"""
from __future__ import annotations

import math

import torch

from bench.core.errors import UnknownChoice
from bench.core.families import FLOW, ModelFamily, require_flow
from bench.core.policy import Cond, PolicyCall


class ODESolver:
    """Advances x from schedule[i] to schedule[i + 1]; `v` is the (counted) evaluation at (x, schedule[i])."""

    def step(self, model: PolicyCall, x: torch.Tensor, v: torch.Tensor, i: int, schedule: torch.Tensor,
             cond: Cond) -> torch.Tensor:
        raise NotImplementedError

    def for_family(self, family: ModelFamily) -> "ODESolver":
        """This solver for `family`'s model; flow-time solvers refuse other families with a one-line error."""
        require_flow(family, f"ODE solver {type(self).__name__}", "solver=euler (the deterministic DDIM step)")
        return self


class EulerSolver(ODESolver):
    """First order: x' = x + dt v (one evaluation per step); on VP models the deterministic DDIM step."""

    def __init__(self, family: ModelFamily = FLOW):
        self.family = family

    def for_family(self, family):
        return EulerSolver(family)

    def step(self, model, x, v, i, schedule, cond):
        return self.family.ode_step(x, v, schedule[i], schedule[i + 1])


class HeunSolver(ODESolver):
    """Heun's second-order method (Karras et al. 2022): an Euler predictor and a trapezoidal corrector, two evaluations per step."""

    def step(self, model, x, v, i, schedule, cond):
        dt = schedule[i + 1] - schedule[i]
        x_pred = x + dt * v
        v_next = model(x_pred, schedule[i + 1].expand(x.shape[0]), cond)
        return x + dt * 0.5 * (v + v_next)


class DPMSolverPP2M(ODESolver):
    """DPM-Solver++(2M) (Lu et al. 2022) in flow time: alpha_t = 1 - t, sigma_t = t, data prediction x0 = x - t v.

    One evaluation per step; the second order comes from the previous step's x0 prediction. The first step after a
    stochastic or missing one, and the step to t = 0, are first order (which for this parametrisation is exactly
    Euler), as diffusers does for few-step schedules.
    """

    def __init__(self) -> None:
        self._prev: tuple[int, torch.Tensor, float] | None = None  # (step, x0 prediction, lambda)

    @staticmethod
    def _lam(t: float) -> float:
        return math.log((1 - t) / t) if t < 1 else -math.inf

    def step(self, model, x, v, i, schedule, cond):
        t, t_next = float(schedule[i]), float(schedule[i + 1])
        x0 = x - t * v
        prev, self._prev = self._prev, (i, x0, self._lam(t))
        if t_next <= 0:
            return x0
        lam, lam_next = self._lam(t), self._lam(t_next)
        h = lam_next - lam
        # exp(-h) = t' (1 - t) / (t (1 - t')), written without the logs so t = 1 stays finite.
        decay = t_next * (1 - t) / (t * (1 - t_next))
        d = x0
        if prev is not None and prev[0] == i - 1 and math.isfinite(prev[2]):
            r = (lam - prev[2]) / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * prev[1]
        return (t_next / t) * x - (1 - t_next) * (decay - 1) * d


ODE_SOLVERS = {"euler": EulerSolver, "heun": HeunSolver, "dpmpp_2m": DPMSolverPP2M}


def ode_solver(name: str) -> ODESolver:
    """A fresh solver by config name (euler | heun | dpmpp_2m)."""
    if name not in ODE_SOLVERS:
        raise UnknownChoice("ODE solver", name, list(ODE_SOLVERS))
    return ODE_SOLVERS[name]()
