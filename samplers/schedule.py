"""Time grids for flow sampling: t from 1 (noise) to 0, with SD3's shift."""
from __future__ import annotations

import torch


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's timestep shift t' = s t / (1 + (s - 1) t)."""
    return shift * t / (1 + (shift - 1) * t)


def flow_schedule(steps: int, shift: float = 1.0) -> torch.Tensor:
    """[steps + 1] times, 1 -> 0, uniform before the shift (as diffusers' FlowMatchEulerDiscreteScheduler)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return shift_time(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift).float()
