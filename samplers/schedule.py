"""Time grids for flow sampling: t from 1 (noise) to 0, with SD3's shift.

Two grids exist in the peers' code (DESIGN section 3): the shifted linspace of DanceGRPO and MixGRPO, and the grid
of diffusers' `FlowMatchEulerDiscreteScheduler.set_timesteps` used by Flow-GRPO, DiffusionNFT, the ELBO repo and
AWM. They differ by up to 0.24 in sigma at T = 10 with shift 3.
"""
from __future__ import annotations

import torch

from bench.core.errors import UnknownChoice

TIME_GRIDS = ("linspace", "scheduler")
NUM_TRAIN_TIMESTEPS = 1000  # SD3's scheduler config; its smallest training sigma is 1 / 1000 before the shift


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's timestep shift t' = s t / (1 + (s - 1) t)."""
    return shift * t / (1 + (shift - 1) * t)


def flow_schedule(steps: int, shift: float = 1.0) -> torch.Tensor:
    """[steps + 1] times shift(linspace(1, 0, steps + 1)): DanceGRPO's and MixGRPO's grid."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return shift_time(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift).float()


def scheduler_schedule(steps: int, shift: float = 1.0, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """[steps + 1] times of diffusers' FlowMatchEulerDiscreteScheduler(shift).set_timesteps(steps), then 0.

    The scheduler shifts its training sigmas once at construction (sigma_min = shift(1 / num_train_timesteps)),
    spaces `steps` times linearly between 1 and that sigma_min, shifts them again, and appends 0: the last noisy
    time is shift(shift(1/1000)), not shift(1 / steps).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    sigma_min = shift_time(torch.tensor(1.0 / num_train_timesteps, dtype=torch.float64), shift)
    t = torch.linspace(1.0, 0.0, steps, dtype=torch.float64) * (1 - sigma_min) + sigma_min
    grid = torch.cat([shift_time(t, shift), torch.zeros(1, dtype=torch.float64)])
    return grid.float()


def time_grid(kind: str, steps: int, shift: float = 1.0) -> torch.Tensor:
    """The sampler's grid by config name (linspace | scheduler)."""
    if kind == "linspace":
        return flow_schedule(steps, shift)
    if kind == "scheduler":
        return scheduler_schedule(steps, shift)
    raise UnknownChoice("sampler.time_grid", kind, list(TIME_GRIDS))
