"""Group-normalised advantages (GRPO, as in Flow-GRPO; DDPO's per-prompt tracking is an option)."""
from __future__ import annotations

from typing import Any, Mapping

import torch

from objectives import ADVANTAGES
from samplers.rollout import Rollout


def normalise_groups(reward: torch.Tensor, group: torch.Tensor, global_std: bool = False, eps: float = 1e-4) -> torch.Tensor:
    """(r - mean_group) / (std_group + eps); std over the whole batch if global_std."""
    n_groups = int(group.max()) + 1
    count = torch.bincount(group, minlength=n_groups).float()
    mean = torch.zeros(n_groups, dtype=reward.dtype).index_add_(0, group, reward) / count
    centred = reward - mean[group]
    if global_std:
        std = reward.std(unbiased=False).expand(n_groups)
    else:
        var = torch.zeros(n_groups, dtype=reward.dtype).index_add_(0, group, centred**2) / count
        std = var.sqrt()
    return centred / (std[group] + eps)


@ADVANTAGES.register("group")
class GroupAdvantage:
    """GRPO advantage per leaf, copied to every node of its chain; `clip` bounds it (default 5)."""

    def __init__(self, cfg: Mapping[str, Any]):
        self.cfg = dict(cfg)

    def leaf_advantages(self, rollout: Rollout) -> torch.Tensor:
        reward = rollout.reward.detach().float().cpu()
        adv = normalise_groups(reward, rollout.leaf_slot.cpu(), bool(self.cfg.get("global_std", False)))
        clip = self.cfg.get("clip", 5.0)
        return adv.clamp(-clip, clip) if clip is not None else adv

    def __call__(self, rollout: Rollout) -> torch.Tensor:
        """[N] advantage of the edge into each node; a node takes the advantage of its chain's leaf."""
        leaf_adv = self.leaf_advantages(rollout)
        adv = torch.zeros(rollout.num_nodes)
        adv[rollout.leaves.cpu()] = leaf_adv
        leaf_of = rollout.leaf_of().cpu()
        return adv[leaf_of].to(rollout.x.device)
