"""`python -m bench.perf handwritten [--repeats N] [--iterations N] [--threads N]`: the reference that
`python -m bench.perf methods` is read against on digits: Flow-GRPO and TreeGRPO as a minimal hand-written loop
(CleanRL style: one function each, top to bottom, no sampler/estimator/objective classes, no Rollout, no meter),
at the presets' settings and batch sizes, on the same digits policy and reward judge.

It prints the same columns as `methods` (ms per iteration, us per NFE, share of wall time outside model
forward/backward and reward calls) for both loops, and the tree's per-NFE cost over the chain's. What it shows:
how much of the `methods` table's overhead is the algorithm's own arithmetic (SDE means and log-densities,
advantages, AdamW, gradient clipping), which any implementation pays, and how much is the framework's.

Settings (experiments/method/flow_grpo.yaml, tree_grpo.yaml, the digits world): 8 prompts x 8 samples, 10 steps
on Flow-GRPO's scheduler grid, flow SDE noise level 0.7, log-densities averaged over dims; Flow-GRPO trains the
first 9 steps of every chain, TreeGRPO the edges of a random window of 3 branching steps (k = 3, 27 leaves per
prompt, window start uniform in [0, 7]); both: group-normalised advantages clipped at 5, PPO-clip 1e-4, two
minibatches (tree siblings together), AdamW lr 3e-4 (foreach, as the loop), gradient norm clipped at 1.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable

import torch

from bench.perf.rounds import mean_row, median_row
from bench.runner.config import compose_config
from bench.runner.resolve import resolve_cell
from bench.runner.components import build_world
from samplers.schedule import time_grid

P, G, STEPS, NOISE, CLIP_RANGE, ADV_CLIP, LR, MAX_NORM = 8, 8, 10, 0.7, 1e-4, 5.0, 3e-4, 1.0
K, DEPTH = 3, 3
LOG_2PI = math.log(2 * math.pi)


class Clock:
    """Seconds inside model forwards, backwards and reward calls of the current iteration."""

    def __init__(self) -> None:
        self.model = self.reward = 0.0

    def timed(self, fn: Callable, kind: str) -> Callable:
        def run(*a):
            t0 = time.perf_counter()
            out = fn(*a)
            setattr(self, kind, getattr(self, kind) + time.perf_counter() - t0)
            return out
        return run


def sde_mean_scale(x, v, s, s_next, s_first):
    """Flow-GRPO's SDE step at times s -> s_next (python floats: every row of a level shares them)."""
    std = NOISE * math.sqrt(s / (1 - (s_first if s >= 1 else s)))
    dt = s_next - s
    return x + dt * (v + std**2 / (2 * s) * (x + (1 - s) * v)), std * math.sqrt(-dt)


def sde_mean_scale_rows(x, v, s, s_next, s_first):
    """The same step with per-row times [B] (training batches mix steps)."""
    std = NOISE * torch.sqrt(s / (1 - torch.where(s >= 1, torch.full_like(s, s_first), s)))
    dt = (s_next - s)[:, None]
    mu = x + dt * (v + (std**2 / (2 * s))[:, None] * (x + (1 - s)[:, None] * v))
    return mu, std * torch.sqrt(-(s_next - s))


def logp_mean(x, mu, scale):
    scale = scale[:, None] if torch.is_tensor(scale) else torch.tensor(scale)
    return (-((x - mu) ** 2) / (2 * scale**2) - torch.log(scale) - 0.5 * LOG_2PI).mean(1)


def group_advantages(reward: torch.Tensor, group: torch.Tensor, global_std: bool) -> torch.Tensor:
    n = int(group.max()) + 1
    mean = torch.zeros(n).index_add_(0, group, reward) / torch.bincount(group, minlength=n)
    centred = reward - mean[group]
    if global_std:
        std = reward.std(unbiased=False)
    else:
        std = (torch.zeros(n).index_add_(0, group, centred**2) / torch.bincount(group, minlength=n)).sqrt()[group]
    return (centred / (std + 1e-4)).clamp(-ADV_CLIP, ADV_CLIP)


def ppo_step(policy, opt, clock, x, t, y, x_next, logp_old, adv, parent_of=None):
    """One optimizer step of PPO-clip on SDE edges (x -> x_next at times t); `parent_of` maps children to the
    rows of x (tree siblings share their parent's forward)."""
    v = policy.velocity(x, t, y)
    s_next = t_next_of(t)
    if parent_of is not None:
        x, v, t, s_next = x[parent_of], v[parent_of], t[parent_of], s_next[parent_of]
    mu, scale = sde_mean_scale_rows(x, v, t, s_next, SCHED_FIRST)
    r = torch.exp(logp_mean(x_next, mu, scale) - logp_old)
    loss = torch.maximum(-adv * r, -adv * r.clamp(1 - CLIP_RANGE, 1 + CLIP_RANGE)).mean()
    opt.zero_grad(set_to_none=True)
    clock.timed(loss.backward, "model")()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), MAX_NORM)
    opt.step()


SCHED = time_grid("scheduler", STEPS, 1.0)
SCHED_LIST = SCHED.tolist()
SCHED_FIRST = SCHED_LIST[1]
NEXT_OF = {a: b for a, b in zip(SCHED_LIST[:-1], SCHED_LIST[1:])}


def t_next_of(t: torch.Tensor) -> torch.Tensor:
    return torch.tensor([NEXT_OF[s] for s in t.tolist()])


def reward_of(world, clock, x0, labels):
    proba = clock.timed(world.judge_proba, "reward")(world.decode(x0))
    return proba[torch.arange(len(labels)), labels]


def flow_grpo_iteration(world, policy, opt, clock, gen) -> int:
    """Flow-GRPO: 64 SDE chains, train the first 9 steps; returns the iteration's NFE."""
    y = torch.randint(10, (P,), generator=gen).repeat_interleave(G)
    x = torch.randn((P * G, 64), generator=gen)
    xs, nexts, ts, logps = [], [], [], []
    with torch.no_grad():
        for i in range(STEPS):
            s, s_next = SCHED_LIST[i], SCHED_LIST[i + 1]
            t = SCHED[i].expand(P * G)
            v = policy.velocity(x, t, y)
            mu, scale = sde_mean_scale(x, v, s, s_next, SCHED_FIRST)
            x_next = mu + scale * torch.randn(mu.shape, generator=gen)
            xs.append(x), nexts.append(x_next), ts.append(t), logps.append(logp_mean(x_next, mu, scale))
            x = x_next
    adv = group_advantages(reward_of(world, clock, x, y), torch.arange(P).repeat_interleave(G), global_std=True)
    trained = STEPS - 1
    X, XN, T = torch.cat(xs[:trained]), torch.cat(nexts[:trained]), torch.cat(ts[:trained])
    LP, A, Y = torch.cat(logps[:trained]), adv.repeat(trained), y.repeat(trained)
    for mb in torch.randperm(len(X), generator=gen).chunk(2):
        ppo_step(policy, opt, clock, X[mb], T[mb], Y[mb], XN[mb], LP[mb], A[mb])
    return P * G * STEPS + 3 * len(X)


def tree_grpo_iteration(world, policy, opt, clock, gen) -> int:
    """TreeGRPO: one root per prompt, ODE / a window of 3 steps branching 3-fold / ODE; returns the NFE."""
    start = int(torch.randint(STEPS - DEPTH + 1, (1,), generator=gen))
    y = torch.randint(10, (P,), generator=gen)
    x = torch.randn((P, 64), generator=gen)
    parents, children, ts, ys, logps = [], [], [], [], []
    nfe = 0
    with torch.no_grad():
        for i in range(STEPS):
            s, s_next = SCHED_LIST[i], SCHED_LIST[i + 1]
            t = SCHED[i].expand(len(x))
            v = policy.velocity(x, t, y)
            nfe += len(x)
            if start <= i < start + DEPTH:
                mu, scale = sde_mean_scale(x, v, s, s_next, SCHED_FIRST)
                mu = mu.repeat_interleave(K, 0)
                x_next = mu + scale * torch.randn(mu.shape, generator=gen)
                parents.append(x), ts.append(t), ys.append(y), children.append(x_next)
                logps.append(logp_mean(x_next, mu, scale))
                x, y = x_next, y.repeat_interleave(K)
            else:
                x = x + (s_next - s) * v
    leaf_adv = group_advantages(reward_of(world, clock, x, y), torch.arange(P).repeat_interleave(K**DEPTH),
                                global_std=False)
    # Back up the leaves' advantages: each edge gets the softmax(logp_old)-weighted mean of its children's.
    edge_adv = [leaf_adv]
    for lp in reversed(logps[1:]):
        w = torch.softmax(lp.view(-1, K).double(), 1)
        edge_adv.insert(0, (w * edge_adv[0].view(-1, K).double()).sum(1).float())
    X, T, Y = torch.cat(parents), torch.cat(ts), torch.cat(ys)
    XN, LP, A = torch.cat(children), torch.cat(logps), torch.cat(edge_adv)
    for mb in torch.randperm(len(X), generator=gen).chunk(2):
        kids = (mb[:, None] * K + torch.arange(K)).flatten()  # children of parent row p: rows pK .. pK + K - 1
        parent_of = torch.arange(len(mb)).repeat_interleave(K)
        ppo_step(policy, opt, clock, X[mb], T[mb], Y[mb], XN[kids], LP[kids], A[kids], parent_of)
        nfe += 3 * len(mb)
    return nfe


LOOPS = {"flow_grpo": flow_grpo_iteration, "tree_grpo": tree_grpo_iteration}


class HandWritten:
    """One hand-written loop with its own policy, optimizer and random stream, timed an iteration at a time (the
    `methods` benchmark interleaves these with the presets in each round)."""

    def __init__(self, name: str, threads: int | None = None):
        self.label, self.loop = f"hand-written {name}", LOOPS[name]
        # Built as a cell builds it: the world caps torch, OpenMP and BLAS pools to world.threads.
        overrides = ["world=digits", *([f"world.threads={threads}"] if threads else [])]
        self.world = build_world(resolve_cell(compose_config(overrides)))
        self.policy = self.world.build_policy()
        self.opt = torch.optim.AdamW(self.policy.parameters(), lr=LR, weight_decay=1e-4, foreach=True)
        self.gen = torch.Generator().manual_seed(0)
        self.clock = Clock()
        self.rows: list[dict[str, float]] = []  # one figure per timed round (bench.perf methods fills it)
        self.policy.velocity = self.clock.timed(self.policy.velocity, "model")

    def iterate(self) -> dict[str, float]:
        """One timed iteration: wall, model, reward and overhead seconds, NFE."""
        self.clock.model = self.clock.reward = 0.0
        t0 = time.perf_counter()
        nfe = self.loop(self.world, self.policy, self.opt, self.clock, self.gen)
        wall = time.perf_counter() - t0
        return {"wall": wall, "model": self.clock.model, "reward": self.clock.reward, "nfe": float(nfe),
                "outside": 1.0 - (self.clock.model + self.clock.reward) / wall}


def measure(loop: HandWritten, repeats: int, iterations: int, warmup: int) -> dict[str, float]:
    """Medians over `repeats` rounds of the loop's per-iteration figures (each round: the mean of `iterations`)."""
    for _ in range(warmup):
        loop.iterate()
    return median_row([mean_row([loop.iterate() for _ in range(iterations)]) for _ in range(repeats)])


def main(argv: list[str]) -> int:
    """Entry point of `python -m bench.perf handwritten`; 0 on success, 2 on a bad option."""
    ap = argparse.ArgumentParser(prog="python -m bench.perf handwritten", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds; medians over them (default 5)")
    ap.add_argument("--iterations", type=int, default=10, help="iterations per round (default 10)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed iterations first (default 3)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: the digits world's, 1)")
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.iterations < 1 or args.warmup < 0 or (args.threads is not None and args.threads < 1):
        print("error: --repeats, --iterations and --threads must be >= 1, --warmup >= 0", file=sys.stderr)
        return 2
    figures = {name: measure(HandWritten(name, args.threads), args.repeats, args.iterations, args.warmup)
               for name in LOOPS}
    print(f"\nhand-written loops on digits: {torch.get_num_threads()} thread(s); medians of {args.repeats} rounds x "
          f"{args.iterations} iterations (after {args.warmup} warm-up)\n")
    print("| loop | ms / iteration | NFE / iteration | us / NFE | outside model+reward |")
    print("|---|---|---|---|---|")
    for name, f in figures.items():
        print(f"| hand-written {name} | {f['wall'] * 1e3:.1f} | {f['nfe']:.0f} | {f['wall'] / f['nfe'] * 1e6:.1f} "
              f"| {f['outside']:.0%} |")
    per_nfe = {n: f["wall"] / f["nfe"] for n, f in figures.items()}
    print(f"\ntree_grpo / flow_grpo per NFE: {per_nfe['tree_grpo'] / per_nfe['flow_grpo']:.2f}x")
    return 0
