"""`python -m bench.perf methods [--world digits|sd3_tiny|both] [--repeats N] [--iterations N] [--threads N]
[--methods a,b] [overrides]`: where each method preset's training iteration spends its time (the default benchmark
of `python -m bench.perf`).

For each method preset (experiments/method/) it builds the cell (bench.training.train.build_state) and runs the
training loop's own iterations (train_iteration), timing the policy's forwards, the backward passes and the reward
calls (decode + reward models) inside them. It prints, per preset: ms per iteration, microseconds per NFE
(nfe_iter as the meter counts it: forward 1, forward+backward 3), the share of wall time outside model
forward/backward and reward calls (the framework's overhead), and the ratio of the iteration to its floor: the same
model calls replayed bare (recorded inputs, no sampler/estimator/optimizer around them) plus the iteration's reward
time. Every figure is the median over `--repeats` rounds of `--iterations` iterations each, the presets
interleaved in each round so load from other processes hits all of them alike. On digits (without overrides) two
reference rows run in the same rounds: Flow-GRPO and TreeGRPO as minimal hand-written loops at the presets' settings
(bench/perf/handwritten.py), and the tree's per-NFE cost over the chain's is printed for presets, floor and loops. `ddpo` needs a VP model: on digits
it runs on digits_vp; on sd3 (flow) it is skipped.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from bench.core.errors import UserError
from bench.perf.handwritten import LOOPS, HandWritten
from bench.perf.rounds import mean_row, median_row
from bench.perf.sd3 import Timers
from bench.runner.components import incompatibility
from bench.runner.config import compose_config, group_options
from bench.runner.resolve import resolve_cell
from bench.training.train import CellState, build_state, train_iteration

WORLDS = {"digits": ["world=digits"], "sd3_tiny": ["world=sd3", "world.variant=tiny"]}
VP_SIBLING = {"digits": ["world=digits_vp"]}  # where a VP-only preset (ddpo) runs instead


@dataclass
class Bench:
    """One preset's cell state, its timers, and the recorded model calls of its last iteration."""

    label: str
    state: CellState
    timers: Timers
    calls: list[tuple] = field(default_factory=list)   # ("fwd", grad, x, t, cond) / ("bwd",) of the last iteration
    rows: list[dict[str, float]] = field(default_factory=list)
    floor_s: list[float] = field(default_factory=list)


def preset_overrides(world: str, method: str) -> list[str] | None:
    """The overrides that run `method` on `world` (its VP sibling for a VP-only preset), or None if it cannot run."""
    for base in (WORLDS[world], VP_SIBLING.get(world)):
        if base is None:
            continue
        cfg = resolve_cell(compose_config([*base, f"method={method}"]))
        if incompatibility(cfg) is None:
            return [*base, f"method={method}"]
    return None


def instrument(label: str, s: CellState) -> Bench:
    """Wrap the policy's forward, the backward phase and the world's reward call with timers that also record
    the forwards' inputs (for the bare replay)."""
    timers = Timers(s.world.device)
    b = Bench(label, s, timers)
    velocity = s.policy.velocity

    def timed_velocity(x, t, cond):
        b.calls.append(("fwd", torch.is_grad_enabled(), x.detach(), t.detach(), cond))
        with timers("model_forward"):
            return velocity(x, t, cond)

    s.policy.velocity = timed_velocity  # an instance attribute: functional_call (old/EMA params) sees it too
    timers.wrap(s.world, "reward", "reward")
    return b


def iterate(b: Bench, iteration: int) -> dict[str, float]:
    """One timed training iteration: wall, model, reward and overhead seconds, NFE."""
    b.timers.acc.clear()
    b.calls.clear()

    def timed(name):
        if name == "est_backward":
            b.calls.append(("bwd",))
        return b.timers(name)

    t0 = time.perf_counter()
    row = train_iteration(b.state, iteration, timed=timed)
    wall = time.perf_counter() - t0
    a = b.timers.acc
    model = a.get("model_forward", 0.0) + a.get("est_backward", 0.0)
    return {"wall": wall, "model": model, "reward": a.get("reward", 0.0), "nfe": float(row["nfe_iter"]),
            "outside": 1.0 - (model + a.get("reward", 0.0)) / wall}


def replay(b: Bench) -> float:
    """Seconds of the last iteration's model calls replayed bare: the same inputs through the same network, the
    grad-enabled ones backpropagated where the iteration ran a backward (the floor, without rewards)."""
    policy, params = b.state.policy, list(b.state.params.values())
    sync = b.timers._sync
    pending: list[torch.Tensor] = []
    sync()
    t0 = time.perf_counter()
    for call in b.calls:
        if call[0] == "bwd":
            if pending:
                torch.stack([o.sum() for o in pending]).sum().backward()
                pending.clear()
            continue
        _, grad, x, t, cond = call
        with torch.set_grad_enabled(grad):
            out = type(policy).velocity(policy, x, t, cond)
        if grad:
            pending.append(out)
    sync()
    elapsed = time.perf_counter() - t0
    for p in params:
        p.grad = None
    return elapsed


def build(world: str, methods: list[str], overrides: list[str]) -> tuple[list[Bench], list[str]]:
    benches, skipped = [], []
    for method in methods:
        ov = preset_overrides(world, method)
        if ov is None:
            skipped.append(method)
            continue
        label = method if ov[0] == WORLDS[world][0] else f"{method} ({ov[0].split('=')[1]})"
        benches.append(instrument(label, build_state(resolve_cell(compose_config([*ov, *overrides])))))
    return benches, skipped


def measure(benches: list[Bench | HandWritten], repeats: int, iterations: int, warmup: int) -> None:
    """Warm-up, then `repeats` rounds; in each round every preset (and hand-written loop) runs `iterations`
    iterations (their mean is the round's figure) and, for a preset, one bare replay."""
    it = {id(b): 0 for b in benches}
    for r in range(repeats + 1):
        for b in benches:
            n = warmup if r == 0 else iterations
            rows = []
            for _ in range(n):
                it[id(b)] += 1
                rows.append(b.iterate() if isinstance(b, HandWritten) else iterate(b, it[id(b)]))
            if r == 0:
                continue
            b.rows.append(mean_row(rows))
            if isinstance(b, Bench):
                b.floor_s.append(replay(b) + b.rows[-1]["reward"])


def table(benches: list[Bench]) -> list[str]:
    lines = ["| preset | ms / iteration | NFE / iteration | us / NFE | outside model+reward | floor ms | x floor |",
             "|---|---|---|---|---|---|---|"]
    for b in benches:
        med = median_row(b.rows)
        floor = statistics.median(b.floor_s) if isinstance(b, Bench) else None
        floor_cols = "| - | - |" if floor is None else f"| {floor * 1e3:.1f} | {med['wall'] / floor:.2f} |"
        lines.append(f"| {b.label} | {med['wall'] * 1e3:.1f} | {med['nfe']:.0f} | {med['wall'] / med['nfe'] * 1e6:.1f} "
                     f"| {med['outside']:.0%} {floor_cols}")
    return lines


def per_nfe_ratios(benches: list[Bench | HandWritten]) -> list[str]:
    """tree_grpo's per-NFE cost over flow_grpo's (issue 12's target: at most 1.1x), for the presets, their bare
    model calls (the floor) and the hand-written loops, where all of a pair ran."""
    by = {b.label: b for b in benches}
    out = []
    for kind, tree, flow in (("presets", "tree_grpo", "flow_grpo"),
                             ("hand-written loops", "hand-written tree_grpo", "hand-written flow_grpo")):
        if tree not in by or flow not in by:
            continue
        t, f = by[tree], by[flow]
        per = lambda b: statistics.median(r["wall"] / r["nfe"] for r in b.rows)
        line = f"tree_grpo / flow_grpo per NFE, {kind}: {per(t) / per(f):.2f}x"
        if kind == "presets":
            floor = lambda b: statistics.median(b.floor_s) / statistics.median(r["nfe"] for r in b.rows)
            line += f" (their bare model calls plus rewards: {floor(t) / floor(f):.2f}x)"
        out.append(line)
    return out


def main(argv: list[str]) -> int:
    """Entry point of `python -m bench.perf methods`; 0 on success, 2 on a bad option."""
    ap = argparse.ArgumentParser(prog="python -m bench.perf methods", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", default="both", choices=[*WORLDS, "both"], help="digits, sd3_tiny or both (default)")
    ap.add_argument("--methods", default=None, help="comma-separated presets (default: every experiments/method/)")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds; medians over them (default 5)")
    ap.add_argument("--iterations", type=int, default=3, help="iterations per preset per round (default 3)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed iterations first (default 2)")
    ap.add_argument("--threads", type=int, default=None, help="world.threads for every preset (default: the world's own)")
    ap.add_argument("--no-handwritten", action="store_true",
                    help="skip the hand-written Flow-GRPO/TreeGRPO reference rows on digits (bench/perf/handwritten.py)")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides applied to every preset, e.g. train.group_size=4")
    args = ap.parse_args(argv)
    all_methods = group_options("method")
    methods = all_methods if args.methods is None else args.methods.split(",")
    bad = [m for m in methods if m not in all_methods]
    if bad or args.repeats < 1 or args.iterations < 1 or args.warmup < 0:
        print(f"error: --methods {','.join(bad)}: unknown; valid: {', '.join(all_methods)}" if bad else
              "error: --repeats and --iterations must be >= 1, --warmup >= 0", file=sys.stderr)
        return 2
    for world in (list(WORLDS) if args.world == "both" else [args.world]):
        try:
            threads = [f"world.threads={args.threads}"] if args.threads else []
            benches, skipped = build(world, methods, [*threads, *args.overrides])
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if world == "digits" and not args.no_handwritten and not args.overrides:  # they run the presets' defaults
            benches += [HandWritten(name, args.threads) for name in LOOPS]
        measure(benches, args.repeats, args.iterations, args.warmup)
        dev = benches[0].state.world.device if benches else "cpu"
        print(f"\n{world}: {torch.get_num_threads()} thread(s), device {dev}; medians of {args.repeats} rounds x "
              f"{args.iterations} iterations (after {args.warmup} warm-up)"
              + (f"; skipped (no compatible world): {', '.join(skipped)}" if skipped else "") + "\n")
        print("\n".join(table(benches)))
        print("\n".join(["", *per_nfe_ratios(benches)]))
        del benches
    print("\nfloor: the iteration's model forwards/backwards replayed bare at the same batch sizes, plus its reward "
          "calls; 'outside model+reward': wall time in none of those calls (sampler, estimator, advantages, "
          "optimizer, bookkeeping).")
    return 0
