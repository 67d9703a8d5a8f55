"""The sampler interface and the chain sampler that trajectory schemes share."""
from __future__ import annotations

from typing import Any, Mapping

import torch

from bench.policy import Cond, PolicyCall, index_cond
from samplers.kernels import EulerODE, gaussian_logp
from samplers.rollout import ODE, SDE, Rollout, RolloutBuilder
from samplers.schedule import flow_schedule
from samplers.solvers import EulerSolver, ODESolver


def randn(shape: tuple, generator: torch.Generator, device: torch.device | str) -> torch.Tensor:
    """Noise drawn on the CPU generator so a seed gives the same numbers on every device."""
    return torch.randn(shape, generator=generator).to(device)


def stochastic_step(kernel: Any, x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
                    schedule: torch.Tensor, generator: torch.Generator, branches: int = 1
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One SDE step with `branches` children per node around the node's one mean (TreeGRPO; 1 for chains).

    Returns, per child [B * branches]: the sample, the transition mean and scale, and the log-density summed
    over dims. Children of node b are rows b * branches ... (b + 1) * branches - 1.
    """
    mu, s = kernel.mean_scale(x, v, sigma, sigma_next, schedule)
    if branches > 1:
        mu, s = mu.repeat_interleave(branches, 0), s.repeat_interleave(branches, 0)
    x_next = mu + s.view(-1, *[1] * (x.ndim - 1)) * randn(mu.shape, generator, x.device)
    return x_next, mu, s, gaussian_logp(x_next, mu, s, "sum")


class Sampler:
    """A rollout scheme: draws samples for prompts and records them as a Rollout."""

    stochastic: bool = True  # has SDE edges (stepwise estimators need them)

    def __init__(self, cfg: Mapping[str, Any]):
        self.cfg = dict(cfg)
        self.steps = int(self.cfg.get("steps", 10))
        self.shift = float(self.cfg.get("shift", 1.0))
        self.guidance = float(self.cfg.get("guidance", 1.0))

    def schedule(self) -> torch.Tensor:
        return flow_schedule(self.steps, self.shift)

    def samples_per_prompt(self, group_size: int) -> int:
        """Final samples per prompt for a requested group size (trees may round)."""
        return group_size

    def sample(self, model: PolicyCall, prompts: list[str], cond: Cond, group_size: int, shape: tuple,
               generator: torch.Generator, iteration: int = 0) -> Rollout:
        raise NotImplementedError


class ChainSampler(Sampler):
    """G independent chains per prompt; `kernel` on the stochastic steps, Euler ODE elsewhere.

    Options: `sde_window: [start, stop)` step indices that are stochastic (default all),
    `train_fraction` of the stochastic steps trained per chain (Flow-GRPO/DanceGRPO subsets),
    `shared_noise` (one initial noise per group, as DanceGRPO).
    """

    kernel: Any = EulerODE()

    def plan(self, iteration: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """This iteration's time grid [S+1] and which of its S steps are stochastic (windowed schemes override)."""
        return self.schedule(), self.sde_steps(iteration)

    def ode_solver(self, sde: torch.Tensor) -> ODESolver:
        """A fresh solver for the deterministic steps of one rollout (MixGRPO-Flash uses a higher order after its window)."""
        return EulerSolver()

    def sde_steps(self, iteration: int) -> torch.Tensor:
        """[T] bool: which steps are stochastic at this iteration."""
        mask = torch.zeros(self.steps, dtype=torch.bool)
        if not self.kernel.stochastic:
            return mask
        window = self.cfg.get("sde_window")
        start, stop = (0, self.steps) if window is None else (int(window[0]), int(window[1]))
        if not 0 <= start < stop <= self.steps:
            raise ValueError(f"sde_window {window} must satisfy 0 <= start < stop <= steps={self.steps}")
        mask[start:stop] = True
        return mask

    def trained_mask(self, sde: torch.Tensor, batch: int, generator: torch.Generator) -> torch.Tensor:
        """[T, B] bool: which stochastic steps each chain trains on."""
        frac = float(self.cfg.get("train_fraction", 1.0))
        mask = sde.unsqueeze(1).expand(-1, batch).clone()
        n_sde = int(sde.sum())
        keep = max(1, round(frac * n_sde)) if n_sde else 0
        if keep < n_sde:
            idx = sde.nonzero().squeeze(1)
            mask[:] = False
            # An independent random subset per chain, drawn for all chains at once (argsort of uniforms).
            chosen = idx[torch.rand(batch, n_sde, generator=generator).argsort(1)[:, :keep]]
            mask[chosen, torch.arange(batch).unsqueeze(1)] = True
        return mask

    def sample(self, model, prompts, cond, group_size, shape, generator, iteration=0):
        device = next(model.policy.parameters()).device
        p, g = len(prompts), group_size
        slot = torch.arange(p).repeat_interleave(g)
        if self.cfg.get("shared_noise", False):
            x = randn((p, *shape), generator, device).repeat_interleave(g, 0)
        else:
            x = randn((p * g, *shape), generator, device)
        cond_b = index_cond(cond, slot.to(device))
        sched, sde = self.plan(iteration, generator)
        sched = sched.to(device)
        builder = RolloutBuilder(sched, prompts, cond, self.kernel, self.guidance)
        ids = builder.add(x, 0, slot)
        trained = self.trained_mask(sde, p * g, generator)
        solver = self.ode_solver(sde)
        for i in range(len(sde)):
            sigma, sigma_next = sched[i].expand(p * g), sched[i + 1].expand(p * g)
            v = model(x, sigma, cond_b)
            if sde[i]:
                x, mu, s, logp = stochastic_step(self.kernel, x, v, sigma, sigma_next, sched, generator)
                ids = builder.add(x, i + 1, slot, ids, SDE, mu, s, logp, trained[i].to(device))
            else:
                x = solver.step(model, x, v, i, sched, cond_b)
                ids = builder.add(x, i + 1, slot, ids, ODE)
        return builder.build(leaves=ids)
