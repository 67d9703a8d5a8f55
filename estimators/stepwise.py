"""Per-step Gaussian log-likelihood of SDE transitions (DDPO, Black et al. 2023; Flow-GRPO)."""
from __future__ import annotations

import torch

from estimators import ESTIMATORS
from estimators.base import Estimate, Estimator
from samplers.kernels import transition_logp


@ESTIMATORS.register("stepwise")
class StepwiseEstimator(Estimator):
    """log N(x_child; mu_theta(x_parent), s^2) per trained SDE edge; one forward per parent node."""

    final_sample = False

    def units(self, rollout):
        return rollout.sde_edges(trained_only=True)

    def unit_groups(self, rollout, units):
        # Tree siblings share their parent's forward: keep them in one minibatch so it runs once per epoch.
        # Chains have a parent per unit; None keeps their plain shuffle.
        parents = rollout.parent[units]
        return parents if len(torch.unique(parents)) < len(parents) else None

    def estimate(self, model, rollout, units, draws):
        parents = rollout.parent[units]
        # Tree children share a parent: evaluate each distinct parent once.
        uniq, inverse = torch.unique(parents, return_inverse=True)
        x_p, t_p = rollout.x[uniq], rollout.t[uniq]
        cond_p = rollout.node_cond(uniq)
        v = model(x_p, t_p, cond_p)
        # The transition mean once per parent, then copied to its children: siblings share it (one step, one
        # time), so a tree's k children cost one mean, and no [units] copies of x_p and v are made (on SD3
        # latents two full-size gathers per minibatch). Per row the same arithmetic as per child.
        t_next = torch.empty_like(t_p)
        t_next[inverse] = rollout.t[units]
        mu_p, _ = rollout.kernel.mean_scale(x_p, v, t_p, t_next, rollout.schedule)
        logp = transition_logp(rollout.kernel, rollout.x[units], mu_p[inverse], rollout.scale[units], self.reduce)
        unit_of_eval = torch.zeros(len(uniq), dtype=torch.long, device=units.device)
        unit_of_eval[inverse] = torch.arange(len(units), device=units.device)
        return Estimate(logp, v, x_p, t_p, cond_p, unit_of_eval)

    def old_logp(self, model_old, rollout, units, draws, generator, is_sampling_policy):
        if is_sampling_policy:
            stored = rollout.logp_old[units]
            return stored / rollout.x[0].numel() if self.reduce == "mean" else stored
        return super().old_logp(model_old, rollout, units, draws, generator, is_sampling_policy)
