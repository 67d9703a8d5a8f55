"""PPO-clip GRPO loss (DDPO, Flow-GRPO, DanceGRPO, MixGRPO, TreeGRPO)."""
from __future__ import annotations

import torch

from objectives import OBJECTIVES
from objectives.base import Objective, ratio_stats


@OBJECTIVES.register("grpo_clip")
class GRPOClip(Objective):
    """Flow-GRPO (arXiv 2505.05470): mean(max(-A r, -A clip(r, 1 - eps, 1 + eps)))."""

    def loss(self, logp, logp_old, adv):
        eps = float(self.cfg.get("clip_range", 1e-4))
        r = torch.exp(logp - logp_old)
        unclipped = -adv * r
        clipped = -adv * torch.clamp(r, 1 - eps, 1 + eps)
        loss = torch.maximum(unclipped, clipped).mean()
        stats = ratio_stats(logp, logp_old)
        stats["clip_frac"] = ((r - 1).abs() > eps).float().mean().item()
        return loss, stats
