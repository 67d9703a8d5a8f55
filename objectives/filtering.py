"""Which action units train: Flow-GRPO drops samples whose advantage is zero at every step."""
from __future__ import annotations

import torch


def drop_zero_advantage(units: torch.Tensor, adv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The units (and their advantages) whose advantage is not exactly 0.

    Flow-GRPO (scripts/train_sd3.py) masks samples with `advantages.abs().sum(dim=1) != 0` over their timesteps;
    a chain's edges share its leaf's advantage, so this per-unit test is the same mask. Flow-GRPO then re-admits a
    few dropped samples at random to keep the count divisible by its number of minibatches; our minibatches take
    any count, so nothing is re-admitted.
    """
    keep = adv != 0
    return units[keep], adv[keep]
