"""Ink reward: the mean brightness of the strokes (a toy aesthetic that is easy to hack)."""
from __future__ import annotations

import torch

from bench.rewards import REWARDS


@REWARDS.register("ink")
class Ink:
    """Mean pixel intensity in [0, 1]; maximised by filling the canvas, a reward-hacking probe."""

    def __init__(self, world, cfg):
        pass

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return images.float().flatten(1).mean(1)
