"""The estimator interface: log-likelihoods of action units under the current or old policy."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from bench.core.policy import Cond, PolicyCall
from bench.core.schema import Configurable, Option
from samplers.rollout import Rollout


@dataclass
class Estimate:
    """Per-unit log-likelihoods plus the model inputs/outputs that produced them (for KL terms)."""

    logp: torch.Tensor        # [U]
    v: torch.Tensor           # [M, *shape] velocities evaluated
    x_in: torch.Tensor        # [M, *shape] inputs they were evaluated at
    t_in: torch.Tensor        # [M]
    cond_in: Cond             # [M]
    unit_of_eval: torch.Tensor  # [M] which unit (0..U-1) each evaluation belongs to


class Estimator(Configurable):
    """Maps a Rollout to action units (node ids) and estimates log pi(unit) for any parameters."""

    GROUP = "estimator"
    OPTIONS = {"reduce": Option("mean", str, choices=("mean", "sum"), help="reduction over non-batch dims")}

    final_sample: bool = False  # True: works on leaves, so any sampler (ODE, trees) will do
    noised_samples: bool = False  # True: estimate() evaluates v at x_t = (1 - t) x0 + t eps of each unit's sample

    def __init__(self, cfg: Mapping[str, Any]):
        self.cfg = self.resolve_options(cfg)
        self.reduce = self.cfg["reduce"]

    def incompatibility(self, sampler) -> str | None:
        """Why this estimator cannot run on `sampler`, or None if it can."""
        if not self.final_sample and not sampler.stochastic:
            return f"estimator '{self.cfg.get('name')}' needs SDE edges but sampler '{sampler.cfg.get('name')}' has none"
        return None

    def units(self, rollout: Rollout) -> torch.Tensor:
        """Node ids of the action units; advantages are indexed by node id."""
        raise NotImplementedError

    def unit_groups(self, rollout: Rollout, units: torch.Tensor) -> torch.Tensor | None:
        """[U] group ids of units that share model evaluations and so must share a minibatch; None if none do."""
        return None

    def prepare(self, rollout: Rollout, units: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Per-iteration random draws, one row per unit (sliced along with the units into minibatches)."""
        return {}

    def estimate(self, model: PolicyCall, rollout: Rollout, units: torch.Tensor, draws: dict) -> Estimate:
        raise NotImplementedError

    def old_logp(self, model_old: PolicyCall, rollout: Rollout, units: torch.Tensor, draws: dict,
                 generator: torch.Generator, is_sampling_policy: bool) -> torch.Tensor:
        """log pi_old(unit); by default a no-grad re-evaluation with the old parameters."""
        with torch.no_grad():
            return self.estimate(model_old, rollout, units, draws).logp
