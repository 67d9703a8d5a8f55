"""Tree advantages (TreeGRPO, arXiv 2512.08153): leaf advantages propagated up the tree, one advantage per edge."""
from __future__ import annotations

from typing import Any, Mapping

import torch

from bench.core.schema import Option
from objectives import ADVANTAGES
from objectives.group_advantage import GroupAdvantage
from samplers.rollout import Rollout


def propagate_up(rollout: Rollout, leaf_adv: torch.Tensor, alpha: float, per_dim: bool) -> torch.Tensor:
    """[N] edge advantages: leaves take `leaf_adv`; every other node the weighted mean of its children's.

    Sibling weights are softmax(alpha * logp_old(child)) over the children of a parent, logp_old per dimension
    if `per_dim` (the suite's 'mean' reduction) else summed. Single-child links (ODE steps, chains) pass the
    value through unchanged. One pass per schedule step, deepest first (a node's value needs its children's):
    levels where every parent has one child (ODE steps) are a plain copy, branching levels one softmax-weighted
    mean over sibling groups indexed by parent id (no sort, no torch.unique). Sums run over the siblings in id
    order, as a per-group loop's would, so the values are the same to the bit.
    """
    n = rollout.num_nodes
    adv = torch.zeros(n, dtype=torch.float64)
    adv[rollout.leaves.cpu()] = leaf_adv.double()
    step, parent = rollout.step.cpu(), rollout.parent.cpu()
    levels = int(step.max()) + 1
    # Computed once for the rollout: the nodes of each step (ascending ids, as a per-step nonzero gives them),
    # and per step the most siblings any of its nodes has (1: a copy level).
    order = torch.argsort(step, stable=True)
    counts = torch.bincount(step, minlength=levels)
    bounds = (torch.cumsum(counts, 0) - counts).tolist()
    has_parent = parent >= 0
    children = torch.bincount(parent[has_parent], minlength=n)
    siblings = torch.zeros(n, dtype=torch.long)
    siblings[has_parent] = children[parent[has_parent]]
    widest = torch.zeros(levels, dtype=torch.long).scatter_reduce(0, step, siblings, "amax").tolist()
    counts_l = counts.tolist()
    logit = None
    for s in range(levels - 1, 0, -1):
        if not counts_l[s]:
            continue
        nodes = order[bounds[s]:bounds[s] + counts_l[s]]
        parents = parent[nodes]
        if widest[s] <= 1:  # one child per parent: its weight is exp(0) = 1 and (1 * A) / 1 = A exactly
            adv[parents] = adv[nodes]
            continue
        if logit is None:
            logit = alpha * rollout.logp_old.detach().cpu().double()
            if per_dim:
                logit = logit / rollout.x[0].numel()
        z = logit[nodes]
        # Sibling groups indexed by the parent's id (buffers over all nodes, no sort): subtract each group's max
        # before exp, as summed log-densities are large in high dimension.
        z_max = torch.full((n,), -torch.inf, dtype=z.dtype).scatter_reduce(0, parents, z, "amax")
        w = torch.exp(z - z_max[parents])
        num = torch.zeros(n, dtype=w.dtype).index_add_(0, parents, w * adv[nodes])
        den = torch.zeros(n, dtype=w.dtype).index_add_(0, parents, w)
        adv[parents] = (num / den)[parents]
    return adv.float()


@ADVANTAGES.register("tree")
class TreeAdvantage(GroupAdvantage):
    """TreeGRPO: leaf advantages normalised over the prompt's leaves, averaged up the tree with sibling weights.

    Our reading of the paper's "probability-weighted" backup (DESIGN section 7): the edge into node u gets
    A(u) = sum_c w_u(c) A(c) over u's children c, w_u = softmax(alpha * logp_old(c)) among siblings, where
    logp_old is the child's log-density under the sampling policy. alpha = 0 is the plain mean (a Monte Carlo
    value estimate of the subtree); alpha = 1 weights each child by its transition probability. `logp_reduce`
    (mean | sum) picks per-dimension or summed log-densities for the weights: summed ones differ by several nats
    between siblings even on 64-dim digits, so alpha = 1 with `sum` is close to picking the likeliest child,
    while `mean` (default, the suite's log-prob convention) keeps the weights near uniform. Leaf normalisation,
    `clip`, `std_eps` and `stat_tracking` are the group advantage's (all leaves of a prompt form its group).
    """

    backs_up_trees = True  # edges shared by several leaves get their subtree's advantage
    OPTIONS = {"alpha": Option(1.0, float, help="sibling weights softmax(alpha * logp_old); 0 = plain mean"),
               "logp_reduce": Option("mean", str, choices=("mean", "sum"), help="log-densities for the weights")}

    def __init__(self, cfg: Mapping[str, Any]):
        super().__init__(cfg)
        self.alpha = float(self.cfg["alpha"])
        self.logp_reduce = str(self.cfg["logp_reduce"])

    def __call__(self, rollout: Rollout) -> torch.Tensor:
        adv = propagate_up(rollout, self.leaf_advantages(rollout), self.alpha, self.logp_reduce == "mean")
        return adv.to(rollout.x.device)
