"""Group-normalised advantages (GRPO, as in Flow-GRPO; DDPO's per-prompt tracking is an option)."""
from __future__ import annotations

from collections import deque
from typing import Any, Mapping

import torch

from bench.core.errors import UserError
from bench.core.schema import Configurable, Option
from objectives import ADVANTAGES
from samplers.rollout import Rollout


def normalise_groups(reward: torch.Tensor, group: torch.Tensor, global_std: bool = False, eps: float = 1e-4,
                     unbiased: bool = False, divide: bool = True) -> torch.Tensor:
    """(r - mean_group) / (std_group + eps); std over the whole batch if global_std, with Bessel's correction if
    `unbiased` (DanceGRPO's and MixGRPO's torch .std(); Flow-GRPO's np.std is the population std). `divide=False`
    returns r - mean_group (the ELBO repo's unnormalised advantage)."""
    n_groups = int(group.max()) + 1
    count = torch.bincount(group, minlength=n_groups).float()
    mean = torch.zeros(n_groups, dtype=reward.dtype).index_add_(0, group, reward) / count
    centred = reward - mean[group]
    if not divide:
        return centred
    if global_std:
        std = reward.std(unbiased=unbiased).expand(n_groups)
    else:
        dof = (count - 1).clamp_min(1) if unbiased else count
        var = torch.zeros(n_groups, dtype=reward.dtype).index_add_(0, group, centred**2) / dof
        std = var.sqrt()
    return centred / (std[group] + eps)


class PromptStatTracker:
    """DDPO's per-prompt reward statistics (Black et al. 2023): the last `buffer_size` rewards of each prompt text.

    A prompt with fewer than `min_count` rewards buffered is normalised with the whole batch's mean and std, as
    DDPO's PerPromptStatTracker does. The buffers outlive an iteration (the advantage object lives as long as
    the cell) and are saved in the cell's checkpoint.
    """

    def __init__(self, buffer_size: int = 16, min_count: int = 16):
        self.buffer_size, self.min_count = int(buffer_size), int(min_count)
        self.buffers: dict[str, deque] = {}

    def normalise(self, reward: torch.Tensor, prompts: list[str], eps: float = 1e-4) -> torch.Tensor:
        """(r - mean) / (std + eps) with each prompt's buffered statistics, after adding this batch's rewards."""
        adv = torch.empty_like(reward)
        batch_mean, batch_std = reward.mean(), reward.std(unbiased=False)
        for prompt in dict.fromkeys(prompts):
            idx = torch.tensor([i for i, q in enumerate(prompts) if q == prompt])
            buf = self.buffers.setdefault(prompt, deque(maxlen=self.buffer_size))
            buf.extend(reward[idx].tolist())
            if len(buf) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                hist = torch.tensor(list(buf), dtype=reward.dtype)
                mean, std = hist.mean(), hist.std(unbiased=False)
            adv[idx] = (reward[idx] - mean) / (std + eps)
        return adv

    def state_dict(self) -> dict[str, list[float]]:
        return {k: list(v) for k, v in self.buffers.items()}

    def load_state_dict(self, state: Mapping[str, list[float]]) -> None:
        self.buffers = {k: deque(v, maxlen=self.buffer_size) for k, v in state.items()}


def clip_and_rescale(adv: torch.Tensor, clip: float | None, rescale_max: float | None) -> torch.Tensor:
    """A clipped to [-clip, clip], then (AWM's advantage_max) mapped onto [-rescale_max, rescale_max]."""
    if clip is not None:
        adv = adv.clamp(-clip, clip)
        if rescale_max is not None:
            adv = adv / clip * rescale_max
    return adv


@ADVANTAGES.register("group")
class GroupAdvantage(Configurable):
    """GRPO advantage per leaf, copied to every node of its chain; `clip` bounds it (default 5).

    `stat_tracking: {buffer_size, min_count}` normalises with per-prompt statistics over past iterations (DDPO)
    instead of the current group's.
    """

    GROUP = "advantage"
    OPTIONS = {
        "global_std": Option(False, bool, help="normalise by the whole batch's std (Flow-GRPO's global_std)"),
        "std_eps": Option(1e-4, float, low=0, help="added to the std"),
        "clip": Option(5.0, float, low=0, low_open=True, nullable=True, help="|A| bound; null = none"),
        "stat_tracking": Option(None, dict, nullable=True, fields={
            "buffer_size": Option(16, int, low=1), "min_count": Option(16, int, low=1)},
            help="DDPO's per-prompt statistics over past iterations"),
        "std_unbiased": Option(False, bool, help="Bessel-corrected std (DanceGRPO, MixGRPO) instead of the population "
                                                 "std (Flow-GRPO)"),
        "normalise": Option("std", str, choices=("std", "none"),
                            help="std: (r - mean) / (std + eps); none: r - mean (the ELBO repo's adv=exact)"),
        "scale": Option(1.0, float, low=0, low_open=True, help="multiplies A before the clip (ELBO repo: beta/alpha)"),
        "rescale_max": Option(None, float, low=0, low_open=True, nullable=True,
                              help="after the clip, A * rescale_max / clip (AWM's advantage_max)"),
    }

    def __init__(self, cfg: Mapping[str, Any]):
        self.cfg = self.resolve_options(cfg)
        if self.cfg["rescale_max"] is not None and self.cfg["clip"] is None:
            raise UserError("advantage.rescale_max needs advantage.clip (it maps [-clip, clip] onto [-rescale_max, rescale_max])")
        track = self.cfg.get("stat_tracking")
        self.tracker = PromptStatTracker(**dict(track)) if track else None

    def leaf_advantages(self, rollout: Rollout) -> torch.Tensor:
        reward = rollout.reward.detach().float().cpu()
        eps = float(self.cfg["std_eps"])
        if self.tracker is not None:
            adv = self.tracker.normalise(reward, [rollout.prompts[s] for s in rollout.leaf_slot.tolist()], eps)
        else:
            adv = normalise_groups(reward, rollout.leaf_slot.cpu(), bool(self.cfg["global_std"]), eps,
                                   bool(self.cfg["std_unbiased"]), self.cfg["normalise"] == "std")
        return clip_and_rescale(self.cfg["scale"] * adv, self.cfg["clip"], self.cfg["rescale_max"])

    def state_dict(self) -> dict:
        """Cross-iteration state for the checkpoint (only DDPO's stat tracking has any)."""
        return {"stat_tracking": self.tracker.state_dict()} if self.tracker is not None else {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.tracker is not None and state.get("stat_tracking") is not None:
            self.tracker.load_state_dict(state["stat_tracking"])

    def __call__(self, rollout: Rollout) -> torch.Tensor:
        """[N] advantage of the edge into each node; a node takes the advantage of its chain's leaf."""
        leaf_adv = self.leaf_advantages(rollout)
        adv = torch.zeros(rollout.num_nodes)
        adv[rollout.leaves.cpu()] = leaf_adv
        leaf_of = rollout.leaf_of().cpu()
        return adv[leaf_of].to(rollout.x.device)
