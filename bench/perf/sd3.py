"""`python -m bench.perf sd3 [--presets a,b] [--group-size G] [--resolution PX] [--prompts P] [--iterations N]
[--warmup N] [overrides]`: where an sd3 training iteration spends its time, per method preset.

For each method preset (experiments/method/: flow_grpo, dance_grpo, mix_grpo, tree_grpo, elbo_epg, nft) it runs the
training loop's own iterations (bench.training.train.train_iteration) on `world=sd3` with the given Hydra overrides
(e.g. `world.variant=tiny`, `world.variant=random_full`), timing each phase (rollout, reward, train forward, train
backward, optimizer) and, inside them, the model calls (transformer forwards, the backward pass, VAE decoding,
reward models). It prints one row per preset: seconds per iteration per phase, the seconds and share of wall time
outside model calls (Python, sampler and estimator arithmetic, data movement: the part a faster GPU does not
shrink) and peak memory (CUDA: the preset's peak allocated; CPU: the process's peak RSS so far).

Sizes: on the tiny variant the defaults are tiny (P=2 prompts x G=4, 10 steps); on random_full / full they are the
SD3.5 grids' (experiments/grid/sd35_*.yaml: G=24 per prompt, 2 prompts per GPU, 10 rollout steps, 512 px). A single
preset's full phase breakdown: `--presets flow_grpo --detail`.
"""
from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from typing import Iterator

import torch

from bench.runner.components import build_world, incompatibility
from bench.runner.config import compose_config, group_options
from bench.core.errors import UnknownChoice, UserError
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


PRESETS = ("flow_grpo", "dance_grpo", "mix_grpo", "tree_grpo", "elbo_epg", "nft")
TINY_SIZES = {"prompts": 2, "group_size": 4, "steps": 10, "resolution": None}
# The SD3.5 grids' sizes (experiments/grid/sd35_*.yaml): Flow-GRPO's group of 24 per prompt, 2 prompts per GPU, T = 10
# rollout steps, 512 px. The tree sampler rounds the group to whole trees (k = d = 3: 27 leaves per root).
PAPER_SIZES = {"prompts": 2, "group_size": 24, "steps": 10, "resolution": 512}


def size_overrides(variant: str, prompts: int | None, group_size: int | None, resolution: int | None,
                   steps: int | None) -> list[str]:
    """The Hydra overrides that set a perf run's sizes: the given ones, else the variant's defaults."""
    d = TINY_SIZES if variant == "tiny" else PAPER_SIZES
    out = [f"train.prompts_per_iter={prompts or d['prompts']}", f"train.group_size={group_size or d['group_size']}",
           f"sampler.steps={steps or d['steps']}"]
    res = resolution or d["resolution"]
    return out + ([f"world.resolution={res}"] if res and variant != "tiny" else [])


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: peak allocated since the last reset (per preset); CPU: the process's peak resident set so far."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def run_presets(presets: list[str], overrides: list[str], iterations: int, warmup: int
                ) -> dict[str, tuple[dict[str, float], float]]:
    """{preset: (mean timings per iteration, peak memory MB)} for each preset, one after another."""
    out = {}
    for preset in presets:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        rows = run([f"method={preset}", *overrides], iterations, warmup)
        mean = {k: statistics.fmean(r[k] for r in rows) for k in rows[0]}
        out[preset] = (mean, peak_memory_mb(torch.device("cuda" if torch.cuda.is_available() else "cpu")))
    return out


def preset_table(results: dict[str, tuple[dict[str, float], float]], header: str) -> str:
    """One row per preset: s/iter and its split, the time outside model calls, and peak memory."""
    cols = [("s/iter", "wall"), ("rollout", "rollout"), ("reward", "reward"), ("train fwd", "est_forward"),
            ("train bwd", "est_backward"), ("optim", "optimizer"), ("other", "overhead")]
    lines = [header, f"{'preset':<12}" + "".join(f"{c:>10}" for c, _ in cols) + f"{'outside':>10}{'share':>8}"
             f"{'peak MB':>10}"]
    for preset, (m, peak) in results.items():
        outside = m["wall"] - m["model"]
        lines.append(f"{preset:<12}" + "".join(f"{m[k]:>10.3f}" for _, k in cols) + f"{outside:>10.3f}"
                     f"{m['outside_model_share']:>8.1%}{peak:>10.0f}")
    lines += ["", "seconds per iteration; rollout / reward / train fwd / train bwd / optim / other add up to s/iter;",
              "outside = s/iter minus the model calls (transformer forwards, backward, VAE decode, reward models)"]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """Entry point of `python -m bench.perf sd3`; 0 on success, 2 on a bad option."""
    ap = argparse.ArgumentParser(prog="python -m bench.perf sd3", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=1, help="timed iterations per preset (mean reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed iterations first (allocator, caches, lazy loads)")
    ap.add_argument("--presets", default=",".join(PRESETS), help="comma-separated method presets (experiments/method/)")
    ap.add_argument("--prompts", type=int, default=None, help="prompts per iteration (per process)")
    ap.add_argument("--group-size", type=int, default=None, help="samples per prompt (tiny: 4; else 24)")
    ap.add_argument("--resolution", type=int, default=None, help="pixels (random_full / full; default 512)")
    ap.add_argument("--steps", type=int, default=None, help="rollout steps (default 10)")
    ap.add_argument("--detail", action="store_true", help="also the phase breakdown of each preset")
    args, overrides = ap.parse_known_args(argv)
    presets = [p for p in args.presets.split(",") if p]
    try:
        if args.iterations < 1 or args.warmup < 0:
            raise UserError(f"--iterations={args.iterations} --warmup={args.warmup}; valid: --iterations >= 1, "
                            "--warmup >= 0")
        for n, v in (("--prompts", args.prompts), ("--group-size", args.group_size), ("--resolution", args.resolution),
                     ("--steps", args.steps)):
            if v is not None and v < 1:
                raise UserError(f"{n}={v}; valid: a positive integer")
        valid = group_options("method")
        for p in presets:
            if p not in valid:
                raise UnknownChoice("method", p, valid)
        cfg = compose_config(["world=sd3", *overrides])
        overrides = [*size_overrides(str(cfg.world.get("variant", "full")), args.prompts, args.group_size,
                                     args.resolution, args.steps), *overrides]
        cfg = resolve_cell(compose_config(["world=sd3", f"method={presets[0]}", *overrides]))
        results = run_presets(presets, overrides, args.iterations, args.warmup)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    world = build_world(cfg)
    header = (f"sd3 perf: variant={cfg.world.variant} device={world.device} dtype={world.cfg['dtype']} "
              f"P={cfg.train.prompts_per_iter} G={cfg.train.group_size} steps={cfg.sampler.steps} "
              f"latents={'x'.join(map(str, world.latent_shape))}; mean of {args.iterations} iteration(s) "
              f"after {args.warmup} warm-up, per preset")
    print(preset_table(results, header))
    if args.detail:
        for preset, (m, _) in results.items():
            print("\n" + report([m], f"{preset}:"))
    return 0
