"""Gradient accumulation inside one optimizer step: a minibatch split into micro-batches of at most
train.micro_batch units, each forward+backward on its own, with losses weighted so the summed gradient equals the
whole minibatch's (memory is set by micro_batch; the number of optimizer steps by train.minibatches)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

RATIO_MIN, RATIO_MAX = "ratio_min", "ratio_max"
# Statistics that are means over model evaluations (Estimate.v rows), not over units: they are weighted like the KL.
EVAL_MEANS = frozenset({"kl", "old_deviation"})


@dataclass(frozen=True)
class MicroBatch:
    """Unit indices of one forward/backward and the weights that turn its means into shares of the minibatch's.

    Every objective is a mean over its units and every KL term a mean over the model evaluations behind them, so
    the minibatch loss is sum_i (unit_weight_i * objective_i + kl_coef * eval_weight_i * kl_i)."""

    idx: torch.Tensor
    unit_weight: float  # units here / units in the minibatch
    eval_weight: float  # evaluations here / evaluations in the minibatch
    groups: int | None  # evaluation groups here (tree parents: one evaluation each); None: units, each costing
                        # the same evaluations (checked against the estimate when a KL term is used)


def micro_batches(mb: torch.Tensor, size: int | None, groups: torch.Tensor | None = None) -> list[MicroBatch]:
    """`mb` in consecutive micro-batches of at most `size` units (None: one, the whole minibatch, weights 1).

    Units sharing a `groups` id (tree siblings: one parent forward, Estimator.unit_groups) stay in one micro-batch,
    packed greedily in order of first appearance; a group larger than `size` gets a micro-batch of its own. With
    groups, each group is one model evaluation (the stepwise estimator's shared parent); without, every unit costs
    the same number of evaluations (1 SDE edge, or J noisings of a sample)."""
    n = len(mb)
    if size is None or size >= n and groups is None:
        return [MicroBatch(mb, 1.0, 1.0, None if groups is None else int(torch.unique(groups[mb]).numel()))]
    if groups is None:
        return [MicroBatch(c, len(c) / n, len(c) / n, None) for c in mb.split(int(size))]
    _, group_of = torch.unique(groups[mb].cpu(), return_inverse=True)
    n_groups = int(group_of.max()) + 1 if n else 0
    order = torch.full((n_groups,), n, dtype=torch.long)  # first position of each group in mb
    order.scatter_reduce_(0, group_of, torch.arange(n), reduce="amin")
    sizes = torch.bincount(group_of, minlength=n_groups)
    packs: list[list[int]] = []
    used = size  # so the first group opens a pack
    for g in order.argsort().tolist():
        k = int(sizes[g])
        if used + k > size:
            packs.append([])
            used = 0
        packs[-1].append(g)
        used += k
    if len(packs) == 1:
        return [MicroBatch(mb, 1.0, 1.0, n_groups)]
    pack_of_group = torch.empty(n_groups, dtype=torch.long)
    for p, members in enumerate(packs):
        pack_of_group[members] = p
    pack_of_unit = pack_of_group[group_of].to(mb.device)
    out = []
    for p, members in enumerate(packs):
        idx = mb[pack_of_unit == p]
        out.append(MicroBatch(idx, len(idx) / n, len(members) / n_groups, len(members)))
    return out


def weighted_loss(objective: torch.Tensor, kl: torch.Tensor | None, kl_coef: float, micro: MicroBatch
                  ) -> torch.Tensor:
    """This micro-batch's share of the minibatch loss objective + kl_coef * kl (both means over the micro-batch)."""
    loss = objective if micro.unit_weight == 1.0 else micro.unit_weight * objective
    if kl is None:
        return loss
    kl_term = kl_coef * kl
    return loss + (kl_term if micro.eval_weight == 1.0 else micro.eval_weight * kl_term)


def check_evaluations(micro: MicroBatch, evaluated: int) -> None:
    """The KL weight assumes one evaluation per group, or the same number per unit; an estimator that evaluates
    otherwise would get a wrong gradient silently, so stop instead."""
    units = len(micro.idx)
    fits = evaluated == micro.groups if micro.groups is not None else evaluated % units == 0
    if not fits and micro.eval_weight != 1.0:
        expected = f"{micro.groups}" if micro.groups is not None else f"a multiple of {units}"
        raise RuntimeError(f"train.micro_batch: expected {expected} model evaluations for {units} units, the "
                           f"estimator made {evaluated}; its KL term cannot be split into micro-batches")


class StepStats:
    """Statistics of one optimizer step combined over its micro-batches: unit-weighted means (evaluation-weighted
    for KL-like ones), min of ratio_min, max of ratio_max, and `loss`, the sum of the weighted losses."""

    def __init__(self) -> None:
        self.values: dict[str, float] = {}

    def _combine(self, key: str, value: float, weight: float, whole: bool) -> None:
        if whole or key not in self.values:
            self.values[key] = value if whole else weight * value
        elif key == RATIO_MIN:
            self.values[key] = min(self.values[key], value)
        elif key == RATIO_MAX:
            self.values[key] = max(self.values[key], value)
        else:
            self.values[key] += weight * value

    def add(self, stats: dict[str, float], loss: float, micro: MicroBatch) -> None:
        """One micro-batch's statistics (means over it) and its weighted loss."""
        whole = micro.unit_weight == 1.0
        for k, v in stats.items():
            w = micro.eval_weight if k in EVAL_MEANS else micro.unit_weight
            self._combine(k, v, 1.0 if k in (RATIO_MIN, RATIO_MAX) else w, whole)
        self._combine("loss", loss, 1.0, whole)
