"""Weighted sums of registered rewards, as configured by `world.reward`."""
from __future__ import annotations

from typing import Any, Mapping

import torch

from bench.rewards import REWARDS


class WeightedReward:
    """sum_k w_k R_k(images, prompts); `spec` is a reward name or a {name: weight} mapping."""

    def __init__(self, spec: str | Mapping[str, Any], world: Any, options: Mapping[str, Any] | None = None):
        weights = {spec: 1.0} if isinstance(spec, str) else {str(k): float(v) for k, v in dict(spec).items()}
        if not weights:
            raise ValueError("world.reward names no reward")
        options = dict(options or {})
        self.weights = weights
        self.parts = {name: REWARDS.get(name)(world, dict(options.get(name, {}) or {})) for name in weights}

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        scores = {name: fn(images, prompts).float() for name, fn in self.parts.items()}
        total = sum(self.weights[n] * s for n, s in scores.items())
        return total, scores
