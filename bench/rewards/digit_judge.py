"""Judge-probability reward for the digits world (the analogue of a GenEval/PickScore reward model)."""
from __future__ import annotations

import torch

from bench.core.errors import UserError
from bench.rewards import REWARDS


@REWARDS.register("digit_judge")
class DigitJudge:
    """Probability the judge classifier (trained on real digits only) gives the prompted digit."""

    def __init__(self, world, cfg):
        if not hasattr(world, "judge_proba"):
            raise UserError(f"reward 'digit_judge' needs the digits world, not '{getattr(world, 'name', world)}'")
        self.world = world

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        labels = torch.tensor([self.world.parse_prompt(p) for p in prompts])
        proba = self.world.judge_proba(images)
        return proba[torch.arange(len(labels)), labels].to(images.device)
