"""DiffusionNFT: negative-aware fine-tuning on the forward process (Zheng et al. 2025, arXiv 2509.16117)."""
from __future__ import annotations

import torch

from bench.core.schema import Option
from objectives import OBJECTIVES
from objectives.base import Objective, old_velocity
from objectives.matching import matching_error, per_unit


@OBJECTIVES.register("nft")
class NFT(Objective):
    """DiffusionNFT: implicit policies v+ = beta v_theta + (1 - beta) v_old and v- = (1 + beta) v_old - beta v_theta,
    optimality weight r = clip(A / (2 A_max) + 1/2, 0, 1), loss A_max mean(r L(v+) + (1 - r) L(v-)) / beta with
    L DiffusionNFT's adaptive flow-matching loss (the official code's scaling by A_max / beta is kept).

    Limits: at v_theta = v_old (the first step on a fresh batch) the gradient equals, for every beta, that of
    mean(clip(A) L(v_theta)): AWM with the adaptive loss. As beta -> 0, v+ and v- collapse onto v_old and the
    gradient tends to that AWM gradient evaluated at the old velocities, a fixed direction per batch; the loss
    value itself grows like L(v_old) A_max / beta. Options: `beta` (default 1.0), `adv_max` (A_max, default 5).
    """

    OPTIONS = {"beta": Option(1.0, float, low=0, low_open=True, help="mixing of v_theta into v+ / v-"),
               "adv_max": Option(5.0, float, low=0, low_open=True, help="A_max of the optimality weight")}
    on_noised_samples = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.beta = float(self.cfg["beta"])
        self.adv_max = float(self.cfg["adv_max"])

    def optimality_weight(self, adv: torch.Tensor) -> torch.Tensor:
        """r in [0, 1]: 1 trains only the positive policy, 0 only the negative one, 1/2 for A = 0."""
        return (adv / (2 * self.adv_max) + 0.5).clamp(0, 1)

    def sample_loss(self, est, x0, adv, model_old):
        v_old = old_velocity(est, model_old)
        v_pos = self.beta * est.v + (1 - self.beta) * v_old
        v_neg = (1 + self.beta) * v_old - self.beta * est.v
        pos = per_unit(matching_error(est, x0, v_pos, "adaptive"), est, len(x0))
        neg = per_unit(matching_error(est, x0, v_neg, "adaptive"), est, len(x0))
        r = self.optimality_weight(adv)
        loss = self.adv_max * ((r * pos + (1 - r) * neg) / self.beta).mean()
        with torch.no_grad():
            stats = {"nft_pos_loss": pos.mean().item(), "nft_neg_loss": neg.mean().item(),
                     "old_deviation": (est.v - v_old).pow(2).mean().item()}
        return loss, stats
