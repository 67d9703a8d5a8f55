"""`python -m bench.perf sd3 [--iterations N] [--warmup N] [overrides]`: where an sd3 training iteration spends its time.

Runs the training loop's steps (rollout, reward, estimator forward, backward, optimizer) on `world=sd3` with the
given Hydra overrides (e.g. `world.variant=tiny`), timing each phase and, inside them, the model calls (transformer
forwards, the backward pass, VAE decoding, reward models). Prints seconds per iteration per phase and the share of
wall time spent outside model calls (Python, sampler and estimator arithmetic, data movement): the part that a
faster GPU does not shrink.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from typing import Iterator

import torch

from bench.runner.components import build_world, incompatibility
from bench.runner.config import compose_config
from bench.core.errors import UserError
from bench.runner.resolve import resolve_cell
from bench.training.train import build_state, train_iteration

PHASES = ("rollout", "reward", "est_forward", "est_backward", "optimizer")


class Timers:
    """Wall-clock accumulators; CUDA is synchronised at every boundary so device time lands in the right phase."""

    def __init__(self, device: torch.device):
        self.device = device
        self.acc: dict[str, float] = defaultdict(float)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.acc[name] += time.perf_counter() - t0

    def wrap(self, obj: object, attr: str, name: str) -> None:
        """Time every call of obj.attr (an instance attribute shadows the method, so functional_call sees it too)."""
        fn = getattr(obj, attr)

        def timed(*a, **k):
            with self(name):
                return fn(*a, **k)

        setattr(obj, attr, timed)


def run(overrides: list[str], iterations: int, warmup: int) -> list[dict[str, float]]:
    """Per-iteration timings (seconds) of `iterations` training iterations after `warmup` untimed ones: the
    iteration is bench.training.train's own (train_iteration), with timers around its model calls and phases."""
    cfg = resolve_cell(compose_config(["world=sd3", *overrides]))
    reason = incompatibility(cfg)
    if reason:
        raise UserError(reason)
    s = build_state(cfg)
    timers = Timers(s.world.device)
    timers.wrap(s.policy, "velocity", "model_forward")
    timers.wrap(s.world, "decode", "model_decode")
    s.world.reward_fn.parts = {n: _timed_reward(fn, timers) for n, fn in s.world.reward_fn.parts.items()}
    phase = s.meter.phase

    @contextmanager
    def timed_phase(name: str) -> Iterator[None]:  # the loop's rollout/reward phases, timed as well
        with phase(name) as m, (timers(name) if name in ("rollout", "reward") else nullcontext()):
            yield m
        if name == "rollout":  # transformer time so far is the rollout's; the rest is the estimator's
            timers.acc["rollout_model"] = timers.acc.get("model_forward", 0.0)

    s.meter.phase = timed_phase
    rows = []
    for it in range(warmup + iterations):
        timers.acc.clear()
        t_start = time.perf_counter()
        train_iteration(s, it + 1, timed=timers)
        wall = time.perf_counter() - t_start
        if it < warmup:
            continue
        a = dict(timers.acc)
        phases = {p: a.get(p, 0.0) for p in PHASES}
        model_s = a.get("model_forward", 0.0) + a.get("model_decode", 0.0) + a.get("model_reward", 0.0) + phases["est_backward"]
        rows.append({"wall": wall, **phases, "overhead": wall - sum(phases.values()),
                     "rollout_model": a.get("rollout_model", 0.0),
                     "train_model_forward": a.get("model_forward", 0.0) - a.get("rollout_model", 0.0),
                     "decode": a.get("model_decode", 0.0), "reward_model": a.get("model_reward", 0.0),
                     "model": model_s, "outside_model_share": 1.0 - model_s / wall})
    return rows


def _timed_reward(fn, timers: Timers):
    def timed(images, prompts):
        with timers("model_reward"):
            return fn(images, prompts)

    return timed


def report(rows: list[dict[str, float]], header: str) -> str:
    """A table of mean seconds per iteration (and the share of wall time) per phase; the phases add up to the wall."""
    med = {k: statistics.fmean(r[k] for r in rows) for k in rows[0]}
    wall = med["wall"]
    lines = [header, f"{'phase':<28}{'s/iter':>10}{'share':>9}"]
    labels = {"rollout": "rollout (sampling)", "reward": "reward (decode + models)", "est_forward": "estimator forward",
              "est_backward": "estimator backward", "optimizer": "optimizer (clip + step)",
              "overhead": "overhead (prompts, adv, ...)"}
    for k, label in labels.items():
        lines.append(f"{label:<28}{med[k]:>10.4f}{med[k] / wall:>9.1%}")
    lines.append(f"{'wall':<28}{wall:>10.4f}{1:>9.1%}")
    lines += ["", "inside those phases, model calls:",
              f"  transformer forwards (rollout)   {med['rollout_model']:.4f} s",
              f"  transformer forwards (training)  {med['train_model_forward']:.4f} s",
              f"  backward                         {med['est_backward']:.4f} s",
              f"  VAE decode                       {med['decode']:.4f} s",
              f"  reward models                    {med['reward_model']:.4f} s",
              f"share of wall time outside model calls: {med['outside_model_share']:.1%} "
              f"(min {min(r['outside_model_share'] for r in rows):.1%}, max {max(r['outside_model_share'] for r in rows):.1%})"]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """Entry point of `python -m bench.perf sd3`; 0 on success, 2 on a bad option."""
    ap = argparse.ArgumentParser(prog="python -m bench.perf sd3", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=3, help="timed iterations (mean reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed iterations first (allocator, caches, lazy loads)")
    args, overrides = ap.parse_known_args(argv)
    if args.iterations < 1 or args.warmup < 0:
        print("error: --iterations must be >= 1 and --warmup >= 0", file=sys.stderr)
        return 2
    try:
        rows = run(overrides, args.iterations, args.warmup)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg = compose_config(["world=sd3", *overrides])
    header = (f"sd3 perf: variant={cfg.world.variant} device={build_world(cfg).device} sampler={cfg.sampler.name} "
              f"(steps={cfg.sampler.steps}, guidance={cfg.sampler.guidance}) estimator={cfg.estimator.name} "
              f"P={cfg.train.prompts_per_iter} G={cfg.train.group_size} minibatches={cfg.train.minibatches}; "
              f"mean of {args.iterations} iterations after {args.warmup} warm-up")
    print(report(rows, header))
    return 0
