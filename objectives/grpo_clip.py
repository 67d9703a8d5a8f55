"""PPO-clip GRPO loss (DDPO, Flow-GRPO, DanceGRPO, MixGRPO, TreeGRPO)."""
from __future__ import annotations

import torch

from bench.core.schema import Option
from objectives import OBJECTIVES
from objectives.base import Objective, ratio_stats


@OBJECTIVES.register("grpo_clip")
class GRPOClip(Objective):
    """Flow-GRPO (arXiv 2505.05470): mean(max(-A r, -A clip(r, 1 - eps, 1 + eps)))."""

    OPTIONS = {"clip_range": Option(1e-4, float, low=0, low_open=True, help="PPO clip eps (Flow-GRPO, DDPO: 1e-4)")}

    def loss(self, logp, logp_old, adv):
        eps = float(self.cfg["clip_range"])
        r = torch.exp(logp - logp_old)
        unclipped = -adv * r
        clipped = -adv * torch.clamp(r, 1 - eps, 1 + eps)
        loss = torch.maximum(unclipped, clipped).mean()
        stats = ratio_stats(logp, logp_old)
        stats["clip_frac"] = ((r - 1).abs() > eps).float().mean().item()
        return loss, stats
