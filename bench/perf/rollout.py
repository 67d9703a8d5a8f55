"""`python -m bench.perf rollout [--prompts N] [--samples N] [--repeats N] [--threads N] [overrides]`: tree vs trajectories.

For the same number of final samples per prompt (default 27 = one k=3, d=3 tree), measures the rollout NFEs and
wall seconds of the tree sampler (at every window start it can draw, and their mean: the expected cost of an
iteration), of independent Flow-GRPO trajectories, and of the DanceGRPO and MixGRPO (and MixGRPO-Flash)
samplers, plus the training NFEs of one update over each rollout's units (stepwise estimator, forward+backward
= 3). Speed-ups are against independent trajectories; 'wall / NFE' is the share of the NFE speed-up that
survives as wall time (1.0 = no framework overhead). Wall time is the minimum over repeats, with the methods
interleaved in each round, so load from other processes hits all of them alike. Hydra overrides pick the world
(the policy that is timed); the default is the digits world's MLP.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass, field
from typing import Any

import torch

from bench.runner.components import build_world, plain
from bench.runner.config import compose_config
from bench.runner.resolve import resolve_cell
from bench.core.errors import UserError
from bench.core.meter import ComputeMeter
from bench.core.policy import PolicyCall
from estimators.stepwise import StepwiseEstimator
from samplers import SAMPLERS
from samplers.tree import tree_nfe

WALL_SHARE_TARGET = 0.85  # acceptance: the tree's wall speed-up is at least 85% of its NFE speed-up


@dataclass
class Case:
    """One sampler configuration and what it measured."""

    label: str
    sampler: Any
    group_size: int
    walls: list[float] = field(default_factory=list)
    nfe: int = 0
    train_nfe: int = 0
    samples: int = 0


def sampler_cfg(name: str, overrides: list[str], **extra: Any) -> dict:
    """The sampler's experiments/ config (so defaults match training runs) with `extra` on top."""
    return {**plain(resolve_cell(compose_config([f"sampler={name}", *overrides])).sampler), **extra}


def build_cases(overrides: list[str], samples: int) -> tuple[list[Case], list[Case]]:
    """(reference and other samplers, one tree case per window start) at `samples` final samples per prompt."""
    tree_base = sampler_cfg("tree", overrides)
    k, d = int(tree_base["branches"]), int(tree_base["depth"])
    if samples % k**d:
        raise UserError(f"--samples {samples} must be a multiple of branches^depth = {k**d} so trees and chains match")
    steps = int(tree_base["steps"])
    window = SAMPLERS.get("tree")(tree_base).window
    trees = [Case(f"tree k={k} d={d} s={s}", SAMPLERS.get("tree")(sampler_cfg(
        "tree", overrides, window={"schedule": "fixed", "start": s})), samples) for s in range(window.lo, window.hi + 1)]
    chains = [
        Case("trajectories (flow_sde)", SAMPLERS.get("flow_sde")(sampler_cfg("flow_sde", overrides, steps=steps)), samples),
        Case("dance_grpo (dance)", SAMPLERS.get("dance")(sampler_cfg("dance", overrides, steps=steps)), samples),
        Case("mix_grpo (mix)", SAMPLERS.get("mix")(sampler_cfg("mix", overrides, steps=steps)), samples),
        Case("mix_grpo-flash (dpmpp_2m, 0.4)", SAMPLERS.get("mix")(sampler_cfg(
            "mix", overrides, steps=steps, post_solver="dpmpp_2m", post_compress=0.4)), samples),
    ]
    return chains, trees


def measure(case: Case, model: PolicyCall, prompts: list[str], cond: Any, shape: tuple, seed: int,
            train: bool) -> None:
    """One timed rollout (wall appended); with `train`, also count one update's training NFE over its units."""
    meter = model.meter
    meter.start_iteration()
    with meter.phase("rollout"), torch.no_grad():
        rollout = case.sampler.sample(model, prompts, cond, case.group_size, shape, torch.Generator().manual_seed(seed), 1)
    case.walls.append(meter.current.phase_s["rollout"])
    case.nfe, case.samples = meter.current.rollout_forwards, len(rollout.leaves) // len(prompts)
    if train:
        est = StepwiseEstimator({"reduce": "mean"})
        units = est.units(rollout)
        with meter.phase("train"):
            est.estimate(model, rollout, units, {}).logp.sum().backward()
        model.policy.zero_grad(set_to_none=True)
        case.train_nfe = meter.current.nfe - case.nfe


def row(label: str, samples: int, nfe: float, wall: float, train_nfe: float, ref: Case | None) -> str:
    nfe_up = ref.nfe / nfe if ref else 1.0
    wall_up = min(ref.walls) / wall if ref else 1.0
    return (f"| {label} | {samples} | {nfe:.0f} | {wall * 1e3:.1f} | {nfe_up:.2f}x | {wall_up:.2f}x | "
            f"{wall_up / nfe_up:.2f} | {train_nfe:.0f} |")


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.perf rollout", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=16, help="prompts per rollout (default 16)")
    ap.add_argument("--samples", type=int, default=27, help="final samples per prompt (default 27)")
    ap.add_argument("--repeats", type=int, default=7, help="timed rounds; the minimum counts (default 7)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the world's `threads`)")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. world=digits")
    args = ap.parse_args(argv)
    try:
        cfg = resolve_cell(compose_config(list(args.overrides)))
        chains, trees = build_cases(list(args.overrides), args.samples)
        world = build_world(cfg)
        policy = world.build_policy()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.threads:  # after the world, which sets its own (digits: 1)
        torch.set_num_threads(args.threads)
    model = PolicyCall(policy, ComputeMeter(device=world.device))
    prompts = world.sample_prompts(args.prompts, torch.Generator().manual_seed(0))
    cond = world.encode(prompts)
    cases = chains + trees
    for r in range(args.repeats + 1):  # round 0 warms up (allocator, kernels) and counts training NFE
        for c in cases:
            measure(c, model, prompts, cond, world.latent_shape, seed=r, train=r == 0)
            if r == 0:
                c.walls.clear()
    ref = chains[0]
    k, d = trees[0].sampler.k, trees[0].sampler.depth
    mean_nfe = statistics.mean(c.nfe for c in trees)
    mean_wall = statistics.mean(min(c.walls) for c in trees)
    mean_train = statistics.mean(c.train_nfe for c in trees)
    print(f"Rollout cost for {args.samples} final samples per prompt x {args.prompts} prompts "
          f"({cfg.world.name} world, {torch.get_num_threads()} CPU threads, device {world.device}; "
          f"min wall of {args.repeats} rounds)\n")
    print("| sampler | samples/prompt | rollout NFE | wall ms | NFE speed-up | wall speed-up | wall / NFE | train NFE per update |")
    print("|---|---|---|---|---|---|---|---|")
    for c in chains:
        print(row(c.label, c.samples, c.nfe, min(c.walls), c.train_nfe, ref if c is not ref else None))
    for c in trees:
        print(row(c.label, c.samples, c.nfe, min(c.walls), c.train_nfe, ref))
    drawn = f"tree k={k} d={d}, window drawn (mean over s)"
    print(row(f"**{drawn}**", trees[0].samples, mean_nfe, mean_wall, mean_train, ref))
    nfe_up, wall_up = ref.nfe / mean_nfe, min(ref.walls) / mean_wall
    steps = trees[0].sampler.steps
    formula = statistics.mean(tree_nfe(k, d, s, steps) for s in range(trees[0].sampler.window.lo, trees[-1].sampler.window.hi + 1))
    print(f"\nTree vs independent trajectories (window drawn uniformly): NFE speed-up {nfe_up:.2f}x, wall speed-up "
          f"{wall_up:.2f}x = {wall_up / nfe_up:.0%} of the NFE speed-up (target >= {WALL_SHARE_TARGET:.0%}: "
          f"{'met' if wall_up >= WALL_SHARE_TARGET * nfe_up else 'NOT met'}).")
    print(f"Per root: {formula:.1f} rollout NFE expected from s + (1 + k + ... + k^(d-1)) + k^d (T - s - d), "
          f"{mean_nfe / (args.prompts * args.samples // k**d):.1f} measured; trajectories {steps * k**d}.")
    print(f"Training NFE per update (forward+backward = 3): tree {mean_train:.0f} vs trajectories {ref.train_nfe} "
          f"({ref.train_nfe / mean_train:.1f}x fewer), one forward per parent node serving its {k} children.")
    return 0
