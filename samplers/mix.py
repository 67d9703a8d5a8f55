"""MixGRPO's mixed ODE-SDE rollouts (Li et al. 2025, arXiv 2507.21802)."""
from __future__ import annotations

import torch

from bench.errors import UserError
from samplers import SAMPLERS
from samplers.base import ChainSampler
from samplers.kernels import sde_kernel
from samplers.schedule import shift_time
from samplers.solvers import EulerSolver, ODESolver, ode_solver
from samplers.window import WindowSchedule


class PostWindowSolver(ODESolver):
    """Euler up to the window, `after` past it: only steps that are never trained may use a higher order."""

    def __init__(self, first_after: int, after: ODESolver):
        self.first_after, self.euler, self.after = first_after, EulerSolver(), after

    def step(self, model, x, v, i, schedule, cond):
        solver = self.after if i >= self.first_after else self.euler
        return solver.step(model, x, v, i, schedule, cond)


@SAMPLERS.register("mix")
class MixSampler(ChainSampler):
    """MixGRPO: SDE inside a window of w steps that moves over iterations, ODE outside; only the window is trained.

    `window` is a WindowSchedule config plus `size`; `post_solver` (euler | heun | dpmpp_2m) and `post_compress`
    (fraction of the post-window steps kept, on a re-spaced grid) give MixGRPO-Flash.
    """

    stochastic = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.kernel = sde_kernel(self.cfg)
        wcfg = dict(self.cfg.get("window") or {})
        self.width = int(wcfg.get("size", 4))
        self.window = WindowSchedule(wcfg, self.steps, self.width)
        self.post_solver = str(self.cfg.get("post_solver", "euler"))
        ode_solver(self.post_solver)  # fail on a bad name at build time, not mid-training
        self.post_compress = float(self.cfg.get("post_compress", 1.0))
        if not 0 < self.post_compress <= 1:
            raise UserError(f"mix post_compress={self.post_compress} must be in (0, 1]")

    def plan(self, iteration, generator):
        start = self.window.start(iteration, generator)
        stop = start + self.width
        sched, sde = self.schedule(), self.window.mask(start, self.steps)
        n_after = self.steps - stop
        keep = max(1, round(self.post_compress * n_after)) if n_after else 0
        if keep < n_after:
            # MixGRPO-Flash: re-space the untrained tail uniformly (before the shift) over fewer steps.
            tail = shift_time(torch.linspace(1 - stop / self.steps, 0.0, keep + 1, dtype=torch.float64), self.shift)
            sched = torch.cat([sched[:stop + 1], tail[1:].float()])
            sde = torch.cat([sde[:stop], torch.zeros(keep, dtype=torch.bool)])
        return sched, sde

    def ode_solver(self, sde):
        stop = int(sde.nonzero().max()) + 1 if sde.any() else 0
        return PostWindowSolver(stop, ode_solver(self.post_solver))
