"""TreeGRPO's tree rollouts (Ding, Ye et al. 2025, arXiv 2512.08153)."""
from __future__ import annotations

import torch

from bench.core.errors import UserError
from bench.core.policy import index_cond
from samplers import SAMPLERS
from samplers.base import Sampler, randn, stochastic_step
from bench.core.schema import Option
from samplers.kernels import KERNEL_OPTIONS, sde_kernel
from samplers.rollout import ODE, SDE, RolloutBuilder
from samplers.solvers import EulerSolver
from samplers.window import WindowSchedule, window_options


def tree_nfe(k: int, d: int, s: int, steps: int) -> int:
    """Rollout model evaluations per root: s + (1 + k + ... + k^(d-1)) + k^d (steps - s - d) (DESIGN section 5)."""
    return s + sum(k**j for j in range(d)) + k**d * (steps - s - d)


@SAMPLERS.register("tree")
class TreeSampler(Sampler):
    """TreeGRPO: ODE to a window of d SDE steps where every node branches into k children, ODE after; k^d leaves per root.

    Each window level is one batched model call over all its nodes; the k children of a node share that
    evaluation (one mean, k noise draws). The window start follows `window` (a WindowSchedule, default
    random over [0, steps - depth] each iteration). Roots per prompt = max(1, group_size // k^d): the group
    size counts final samples and trees round it to whole roots.
    """

    OPTIONS = {
        **KERNEL_OPTIONS,
        "branches": Option(3, int, low=1, help="k children per window node"),
        "depth": Option(3, int, low=1, help="d SDE steps in the window"),
        "window": Option({}, dict, fields=window_options("random")),
    }
    stochastic = True
    shares_prefixes = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.kernel = sde_kernel(self.cfg)
        self.k, self.depth = int(self.cfg.get("branches", 3)), int(self.cfg.get("depth", 3))
        if self.k < 1 or self.depth < 1:
            raise UserError(f"tree branches ({self.k}) and depth ({self.depth}) must be >= 1")
        self.window = WindowSchedule({"schedule": "random", **dict(self.cfg.get("window") or {})}, self.steps, self.depth)

    def roots(self, group_size: int) -> int:
        return max(1, group_size // self.k**self.depth)

    def samples_per_prompt(self, group_size):
        return self.roots(group_size) * self.k**self.depth

    def sample(self, model, prompts, cond, group_size, shape, generator, iteration=0):
        device = next(model.policy.parameters()).device
        slot = torch.arange(len(prompts), device=device).repeat_interleave(self.roots(group_size))
        x = randn((len(slot), *shape), generator, device)
        family = model.policy.family  # the kernel and the ODE step convert the model's output through it
        kernel = self.kernel.bind(family)
        sched = self.schedule(family).to(device)
        builder = RolloutBuilder(sched, prompts, cond, kernel, self.guidance, family)
        ids = builder.add(x, 0, slot)
        start = self.window.start(iteration, generator)
        ode = EulerSolver(family)
        cond_b = index_cond(cond, slot)
        for i in range(self.steps):
            b = len(slot)
            sigma, sigma_next = sched[i].expand(b), sched[i + 1].expand(b)
            v = model(x, sigma, cond_b)
            if start <= i < start + self.depth:
                x, mu, s, logp = stochastic_step(kernel, x, v, sigma, sigma_next, sched, generator, self.k)
                parent = ids.repeat_interleave(self.k)
                slot = slot.repeat_interleave(self.k)
                cond_b = index_cond(cond, slot)
                ids = builder.add(x, i + 1, slot, parent, SDE, mu, s, logp, True)
            else:
                x = ode.step(model, x, v, i, sched, cond_b)
                ids = builder.add(x, i + 1, slot, ids, ODE)
        return builder.build(leaves=ids)
