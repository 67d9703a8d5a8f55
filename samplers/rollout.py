"""The Rollout: one batched forest structure shared by every rollout scheme (DESIGN section 4)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from bench.core.families import FLOW, ModelFamily
from bench.core.policy import Cond, index_cond

ROOT, ODE, SDE = 0, 1, 2  # kind of the edge into a node


@dataclass
class Rollout:
    """Nodes indexed by id; node i was reached from parent[i] by an edge of kind[i].

    For SDE edges, mean/scale are the Gaussian transition N(mean, scale^2 I) and logp_old is the
    child's log-density under the sampling policy, summed over non-batch dims (estimators rescale
    it to their own reduction, so one rollout serves 'mean' and 'sum').
    Leaves carry the final samples, their prompt slot and, once scored, their reward.
    """

    x: torch.Tensor          # [N, *shape]
    t: torch.Tensor          # [N] time of the node in the model family's convention (1 = noise)
    step: torch.Tensor       # [N] schedule index of the node
    parent: torch.Tensor     # [N] parent id, -1 for roots
    slot: torch.Tensor       # [N] prompt slot
    kind: torch.Tensor       # [N] ROOT / ODE / SDE
    mean: torch.Tensor       # [N, *shape] transition mean into the node (zeros unless SDE)
    scale: torch.Tensor      # [N] transition std into the node (0 unless SDE)
    logp_old: torch.Tensor   # [N] summed log-density under the sampling policy (0 unless SDE)
    trained: torch.Tensor    # [N] bool: the edge into this node is an action unit for stepwise training
    leaves: torch.Tensor     # [L] node ids of final samples
    schedule: torch.Tensor   # [T+1] the time grid, schedule[0] = 1, schedule[T] = 0
    prompts: list[str]       # per slot
    cond: Cond               # per slot
    kernel: Any              # the transition kernel of the SDE edges (recomputes means)
    guidance: float = 1.0
    reward: torch.Tensor | None = None           # [L]
    reward_parts: dict[str, torch.Tensor] = field(default_factory=dict)
    scored: torch.Tensor | None = None           # [L, *shape] what the reward sees when not the leaves' x (x0_hat)
    family: ModelFamily = FLOW                   # the policy's model family (flow matching or VP)

    @property
    def num_nodes(self) -> int:
        return self.x.shape[0]

    @property
    def leaf_slot(self) -> torch.Tensor:
        return self.slot[self.leaves]

    @property
    def x0(self) -> torch.Tensor:
        return self.x[self.leaves]

    @property
    def reward_input(self) -> torch.Tensor:
        """[L, *shape] the samples the reward scores: the leaves, or the sampler's `scored` stand-ins (x0_hat)."""
        return self.x0 if self.scored is None else self.scored

    def node_cond(self, nodes: torch.Tensor) -> Cond:
        return index_cond(self.cond, self.slot[nodes])

    def sde_edges(self, trained_only: bool = True) -> torch.Tensor:
        mask = self.kind == SDE
        if trained_only:
            mask &= self.trained
        return mask.nonzero().squeeze(1)

    def leaf_of(self) -> torch.Tensor:
        """[N] the id of a leaf below each node (for trees, one of several), filled level by level."""
        out = torch.full((self.num_nodes,), -1, dtype=torch.long, device=self.x.device)
        out[self.leaves] = self.leaves
        for s in range(int(self.step.max()), 0, -1):
            nodes = (self.step == s).nonzero().squeeze(1)
            nodes = nodes[out[nodes] >= 0]
            out[self.parent[nodes]] = out[nodes]
        return out

    def path_nodes(self, nodes: torch.Tensor) -> torch.Tensor:
        """[len(nodes), T+1] the node at each schedule step on the path from the root to each node (-1 below it)."""
        out = torch.full((len(nodes), len(self.schedule)), -1, dtype=torch.long, device=self.x.device)
        rows, node = torch.arange(len(nodes), device=self.x.device), nodes
        while len(node):
            out[rows, self.step[node]] = node
            node = self.parent[node]
            rows, node = rows[node >= 0], node[node >= 0]
        return out


class RolloutBuilder:
    """Appends nodes level by level, then builds the Rollout's columns once.

    A level keeps only what differs per node (samples, SDE means/scales/log-densities, parents, slots); the
    constant columns (time, step, kind, zeros off SDE edges) are written in `build` for all levels together: a
    rollout step costs no per-column tensor of its own (issue 12: ~10 small ops per level before).
    """

    def __init__(self, schedule: torch.Tensor, prompts: list[str], cond: Cond, kernel: Any, guidance: float,
                 family: ModelFamily = FLOW):
        self.schedule, self.prompts, self.cond, self.kernel, self.guidance = schedule, prompts, cond, kernel, guidance
        self.family = family
        self._times = schedule.tolist()  # read once: float(schedule[step]) per level would sync a GPU each time
        self._levels: list[tuple[int, int, int]] = []  # (size, step, kind)
        self._x: list[torch.Tensor] = []
        self._parent: list[torch.Tensor | None] = []
        self._slot: list[torch.Tensor] = []
        self._sde: list[tuple[int, int, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]] = []
        self._trained: list[bool | torch.Tensor] = []
        self.count = 0

    def add(self, x: torch.Tensor, step: int, slot: torch.Tensor, parent: torch.Tensor | None = None,
            kind: int = ROOT, mean: torch.Tensor | None = None, scale: torch.Tensor | None = None,
            logp_old: torch.Tensor | None = None, trained: bool | torch.Tensor = False) -> torch.Tensor:
        """Add a level of B nodes; returns their ids."""
        b = x.shape[0]
        ids = torch.arange(self.count, self.count + b)
        if mean is not None or scale is not None or logp_old is not None:
            self._sde.append((self.count, b, mean, scale, logp_old))
        self.count += b
        self._levels.append((b, step, kind))
        self._x.append(x)
        self._parent.append(parent)
        self._slot.append(slot)
        self._trained.append(trained)
        return ids

    def build(self, leaves: torch.Tensor, scored: torch.Tensor | None = None) -> Rollout:
        x = torch.cat(self._x, 0)
        dev, n = x.device, x.shape[0]
        sizes = torch.tensor([b for b, _, _ in self._levels])
        t = torch.tensor([self._times[st] for _, st, _ in self._levels], dtype=torch.float32).repeat_interleave(sizes)
        step = torch.tensor([st for _, st, _ in self._levels], dtype=torch.long).repeat_interleave(sizes)
        kind = torch.tensor([k for _, _, k in self._levels], dtype=torch.int8).repeat_interleave(sizes)
        parent = torch.cat([torch.full((b,), -1, dtype=torch.long) if p is None else p.cpu()
                            for (b, _, _), p in zip(self._levels, self._parent)])
        slot = torch.cat([s.cpu() for s in self._slot])
        trained = torch.cat([torch.full((b,), bool(tr)) if not isinstance(tr, torch.Tensor) or tr.ndim == 0
                             else tr.cpu() for (b, _, _), tr in zip(self._levels, self._trained)])
        mean, scale, logp_old = torch.zeros_like(x), torch.zeros(n, device=dev), torch.zeros(n, device=dev)
        for start, b, mu, sc, lp in self._sde:
            if mu is not None:
                mean[start:start + b] = mu
            if sc is not None:
                scale[start:start + b] = sc.expand(b).float()
            if lp is not None:
                logp_old[start:start + b] = lp.float()
        cols = {"x": x, "t": t.to(dev), "step": step.to(dev), "parent": parent.to(dev), "slot": slot.to(dev),
                "kind": kind.to(dev), "mean": mean, "scale": scale, "logp_old": logp_old, "trained": trained.to(dev)}
        return Rollout(**cols, leaves=leaves.to(dev), schedule=self.schedule, prompts=self.prompts,
                       cond=self.cond, kernel=self.kernel, guidance=self.guidance, scored=scored, family=self.family)
