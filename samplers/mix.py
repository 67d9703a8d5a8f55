"""MixGRPO's mixed ODE-SDE rollouts (Li et al. 2025, arXiv 2507.21802)."""
from __future__ import annotations

import torch

from bench.core.errors import UserError
from bench.core.families import FLOW
from samplers import SAMPLERS
from samplers.base import ChainSampler
from bench.core.schema import Option
from samplers.kernels import KERNEL_OPTIONS, sde_kernel
from samplers.schedule import shift_time
from samplers.solvers import ODE_SOLVERS, EulerSolver, ODESolver, ode_solver
from samplers.window import WindowSchedule, window_options


class PostWindowSolver(ODESolver):
    """Euler up to the window, `after` past it: only steps that are never trained may use a higher order."""

    def __init__(self, first_after: int, after: ODESolver, euler: EulerSolver | None = None):
        self.first_after, self.euler, self.after = first_after, euler or EulerSolver(), after

    def for_family(self, family):
        return PostWindowSolver(self.first_after, self.after.for_family(family), EulerSolver(family))

    def step(self, model, x, v, i, schedule, cond):
        solver = self.after if i >= self.first_after else self.euler
        return solver.step(model, x, v, i, schedule, cond)


def post_window_steps(compress: float, n_after: int, rule: str) -> int:
    """Steps kept after the window: round(compress n) (nearest), or MixGRPO's int(max(compress (n + 1), 1)) grid
    points counting both ends (floor_points: one step fewer), never below one step."""
    if not n_after:
        return 0
    if rule == "nearest":
        return max(1, round(compress * n_after))
    return max(1, int(max(compress * (n_after + 1), 1)) - 1)


@SAMPLERS.register("mix")
class MixSampler(ChainSampler):
    """MixGRPO: SDE inside a window of w steps that moves over iterations, ODE outside; only the window is trained.

    `window` is a WindowSchedule config plus `size`; `post_solver` (euler | heun | dpmpp_2m) and `post_compress`
    (fraction of the post-window steps kept, on a re-spaced grid) give MixGRPO-Flash.
    """

    OPTIONS = {
        **KERNEL_OPTIONS,
        "window": Option({}, dict, fields={"size": Option(4, int, low=1, help="w"), **window_options("progressive")}),
        "post_solver": Option("euler", str, choices=tuple(ODE_SOLVERS), help="ODE solver after the window"),
        "post_compress": Option(1.0, float, low=0, low_open=True, high=1,
                                help="fraction of post-window steps kept (MixGRPO-Flash: 0.4)"),
        "post_keep": Option("nearest", str, choices=("nearest", "floor_points"),
                            help="nearest: round(c n) post-window steps; floor_points: MixGRPO's "
                                 "int(c (n + 1)) grid points, one step fewer"),
    }
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

    def plan(self, iteration, generator, family=FLOW):
        start = self.window.start(iteration, generator)
        sched, sde = self.schedule(family), self.window.mask(start, self.steps)
        stop = int(sde.nonzero().max()) + 1 if sde.any() else start  # MixGRPO's empty window at the limit
        n_after = self.steps - stop
        keep = post_window_steps(self.post_compress, n_after, self.cfg["post_keep"])
        if keep < n_after:
            if family.name != "flow":
                raise UserError(f"sampler.post_compress={self.post_compress} re-spaces flow time; this world's "
                                f"model is '{family.name}'; valid on it: 1.0")
            # MixGRPO-Flash: re-space the untrained tail uniformly (before the shift) over fewer steps.
            tail = shift_time(torch.linspace(1 - stop / self.steps, 0.0, keep + 1, dtype=torch.float64), self.shift)
            sched = torch.cat([sched[:stop + 1], tail[1:].float()])
            sde = torch.cat([sde[:stop], torch.zeros(keep, dtype=torch.bool)])
        return sched, sde

    def ode_solver(self, sde):
        stop = int(sde.nonzero().max()) + 1 if sde.any() else 0
        return PostWindowSolver(stop, ode_solver(self.post_solver))
