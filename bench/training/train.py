"""The training loop of one cell, top to bottom: rollout -> reward -> advantages -> estimator -> objective."""
from __future__ import annotations


from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ContextManager

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from bench.runner import distributed, store
from bench.runner.components import Components, build_methods, build_world
from bench.core.errors import Diverged
from bench.core.meter import ComputeMeter
from bench.training.ema import ema_decay, ema_update, optimizer_steps
from bench.core.policy import Policy, PolicyCall
from bench.runner.resolve import resolve_cell

from objectives.filtering import drop_zero_advantage
from objectives.kl import kl_penalty

TIMING_KEYS = ("iter_wall_s", "wall_s", "device_s", "device_hours", "peak_mem_mb", "rollout_s", "reward_s", "train_s")


def check_finite(quantity: str, value: torch.Tensor, iteration: int) -> None:
    """Diverged(quantity, iteration) if any element of `value` is NaN or infinite."""
    # Every rank of a data-parallel cell stops at the same check (a lone rank raising would leave the others
    # waiting in a collective).
    if distributed.any_rank(not bool(torch.isfinite(value).all())):
        bad = int((~torch.isfinite(value)).sum())
        raise Diverged(quantity, iteration, f"{bad} of {value.numel()} values")


def budget_reached(cfg: DictConfig, iteration: int, meter: ComputeMeter) -> bool:
    b = cfg.budget
    return ((b.iterations is not None and iteration >= b.iterations)
            or (b.nfe is not None and meter.total_nfe >= b.nfe)
            or (b.device_hours is not None and meter.total_device_s / 3600 >= b.device_hours))


def eval_due(cfg: DictConfig, iteration: int, nfe_before: int, nfe_after: int) -> bool:
    every_nfe = cfg.eval.get("every_nfe")
    if every_nfe:
        return nfe_after // every_nfe > nfe_before // every_nfe
    return iteration % int(cfg.eval.every) == 0


def minibatch_indices(n: int, minibatches: int, generator: torch.Generator,
                      groups: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Shuffled minibatches of unit indices; units with one `groups` id (tree siblings) land in the same one."""
    if groups is None:
        perm = torch.randperm(n, generator=generator)
        return [c for c in perm.chunk(max(1, min(minibatches, n))) if len(c)]
    _, group_of = torch.unique(groups.cpu(), return_inverse=True)
    n_groups = int(group_of.max()) + 1
    chunk_of_group = torch.empty(n_groups, dtype=torch.long)
    chunks = torch.randperm(n_groups, generator=generator).chunk(max(1, min(minibatches, n_groups)))
    for c, members in enumerate(chunks):
        chunk_of_group[members] = c
    chunk_of_unit = chunk_of_group[group_of]
    return [(chunk_of_unit == c).nonzero().squeeze(1) for c in range(len(chunks))]


@dataclass
class CellState:
    """Everything one cell's iterations share: built once, then updated in place (never per iteration)."""

    cfg: DictConfig
    world: Any
    methods: Components
    policy: Policy
    params: dict[str, torch.nn.Parameter]
    opt: torch.optim.Optimizer
    meter: ComputeMeter
    model: PolicyCall
    gen: torch.Generator
    ref_params: dict[str, torch.Tensor]
    ema_params: dict[str, torch.Tensor] | None
    sample_with_old: bool


def build_state(cfg: DictConfig) -> CellState:
    """World, methods, policy, optimizer and meter of a cell, seeded from cfg.seed (nothing is read or written)."""
    cfg = resolve_cell(cfg)  # a no-op on a cell's config; fills defaults and checks the budget otherwise
    torch.manual_seed(int(cfg.seed))
    gen = torch.Generator().manual_seed(int(cfg.seed))
    world = build_world(cfg)
    m = build_methods(cfg)
    policy = world.build_policy()
    world, policy = distributed.wrap(world, policy)  # multi-process: prompt shards, averaged grads; else a no-op
    params = policy.trainable_named_parameters()
    opt = torch.optim.AdamW(params.values(), lr=float(cfg.train.lr), weight_decay=float(cfg.train.weight_decay))
    meter = distributed.make_meter(world.device)  # one process: ComputeMeter(num_devices=1)
    ema_params = policy.snapshot() if cfg.train.old_policy == "ema" else None
    model = PolicyCall(policy, meter, guidance=m.sampler.guidance, detach_uncond=bool(cfg.train.detach_uncond))
    return CellState(cfg, world, m, policy, params, opt, meter, model,
                     gen, policy.snapshot(), ema_params,
                     ema_params is not None and cfg.train.get("sampling_policy", "current") == "old")


def train_iteration(s: CellState, iteration: int, timed: Callable[[str], ContextManager] = lambda name: nullcontext()
                    ) -> dict[str, Any]:
    """One RL iteration, top to bottom: rollout -> reward -> advantages -> estimator -> objective -> optimizer.

    Returns the iteration's metrics row (compute counters, training statistics; no eval). `timed(name)` wraps the
    estimator forward, the backward pass and the optimizer step (bench.perf times them; a no-op otherwise)."""
    cfg, world, m, model, meter, gen = s.cfg, s.world, s.methods, s.model, s.meter, s.gen
    P, G = int(cfg.train.prompts_per_iter), int(cfg.train.group_size)
    meter.start_iteration()

    # 1. Rollout with the sampling policy (the current one, or the EMA old policy).
    prompts = world.sample_prompts(P, gen)
    cond = world.encode(prompts)
    with meter.phase("rollout"), torch.no_grad():
        sampler_model = model.with_params(s.ema_params) if s.sample_with_old else model
        rollout = m.sampler.sample(sampler_model, prompts, cond, G, world.latent_shape, gen, iteration)
    # A diverged policy's samples never reach a reward model (scikit-learn and CLIP fail on NaN inputs).
    check_finite("samples", rollout.x0, iteration)

    # 2. Rewards of the final samples.
    with meter.phase("reward"):
        leaf_prompts = [prompts[i] for i in rollout.leaf_slot.tolist()]
        rollout.reward, rollout.reward_parts = world.reward(rollout.reward_input, leaf_prompts, meter)
    check_finite("rewards", rollout.reward, iteration)

    # 3. Advantages per node, then the estimator's action units.
    adv_nodes = m.advantage(rollout)
    units = m.estimator.units(rollout)
    adv = adv_nodes[units]
    if cfg.train.drop_zero_advantage:
        units, adv = drop_zero_advantage(units, adv)
    draws = m.estimator.prepare(rollout, units, gen)

    # 4. Policy update: epochs x minibatches optimizer steps against a fixed old policy.
    old_params = s.ema_params if s.ema_params is not None else s.policy.snapshot()
    is_sampling = s.ema_params is None or s.sample_with_old  # the old policy is the one that sampled
    stats_acc: dict[str, list[float]] = {}
    with meter.phase("train"):
        # log pi_old per unit, filled on first use: the units of the first minibatch take the current policy's
        # own value (it *is* the sampling policy then), so only later minibatches pay old-policy forwards.
        logp_old_all = torch.full((len(units),), float("nan"), device=units.device)
        known = torch.zeros(len(units), dtype=torch.bool, device=units.device)
        groups = m.estimator.unit_groups(rollout, units)
        stepped = False
        for _ in range(int(cfg.train.epochs)):
            for mb in minibatch_indices(len(units), int(cfg.train.minibatches), gen, groups):
                with timed("est_forward"):
                    est = m.estimator.estimate(model, rollout, units[mb], {k: v[mb] for k, v in draws.items()})
                    # Before the first optimizer step the current policy *is* the sampling policy: reuse its value
                    # exactly (a stored or batch-recomputed value differs in the last bits), so the ratio is 1.
                    fresh = s.ema_params is None and not stepped
                    if m.objective.on_noised_samples:  # nft, awm: v_old per minibatch, no log-likelihood
                        model_old = None if fresh else model.with_params(old_params)
                        loss, stats = m.objective.sample_loss(est, rollout.x[units[mb]], adv[mb], model_old)
                    else:
                        if fresh:
                            logp_old_all[mb], known[mb] = est.logp.detach(), True
                        missing = mb[~known[mb]]
                        if len(missing):
                            logp_old_all[missing] = m.estimator.old_logp(
                                model.with_params(old_params), rollout, units[missing],
                                {k: v[missing] for k, v in draws.items()}, gen, is_sampling)
                            known[missing] = True
                        loss, stats = m.objective.loss(est.logp, logp_old_all[mb], adv[mb])
                    if cfg.train.kl_coef:
                        kl = kl_penalty(cfg.train.get("kl_type", "velocity"), est, model.with_params(s.ref_params),
                                        rollout, units[mb])
                        loss = loss + float(cfg.train.kl_coef) * kl
                        stats["kl"] = kl.item()
                check_finite("loss", loss, iteration)
                with timed("est_backward"):
                    s.opt.zero_grad(set_to_none=True)
                    loss.backward()
                with timed("optimizer"):
                    grad_norm = torch.nn.utils.clip_grad_norm_(s.params.values(), float(cfg.train.max_grad_norm))
                    check_finite("gradients", grad_norm, iteration)  # before the step: the weights stay finite
                    s.opt.step()
                stepped = True
                stats.update(loss=loss.item(), grad_norm=grad_norm.item())
                for k, v in stats.items():
                    stats_acc.setdefault(k, []).append(v)
    if s.ema_params is not None:
        ema_update(s.ema_params, s.params, ema_decay(cfg.train, iteration, optimizer_steps(s.opt)))

    # 5. The row: compute figures and training statistics.
    row = {"iteration": iteration, **meter.end_iteration()}
    row.update({k: (min(v) if k == "ratio_min" else max(v) if k == "ratio_max" else sum(v) / len(v))
                for k, v in stats_acc.items()})
    all_rewards = distributed.all_gather(rollout.reward)  # every rank's rewards (this rank's in one process)
    row.update(train_reward_mean=all_rewards.mean().item(), train_reward_std=all_rewards.std().item(),
               num_units=len(units), num_samples=len(rollout.leaves))
    return row


def checkpoint_state(s: CellState, iteration: int) -> dict[str, Any]:
    """What a resume needs: weights, optimizer, meter, random streams, EMA, advantage statistics."""
    m = s.methods
    return {"iteration": iteration, "params": s.policy.snapshot(), "optimizer": s.opt.state_dict(),
            "meter": s.meter.state_dict(), "generator": s.gen.get_state(), "torch_rng": torch.get_rng_state(),
            "ema": s.ema_params, "advantage": m.advantage.state_dict() if hasattr(m.advantage, "state_dict") else None}


def resume(s: CellState, ckpt: dict[str, Any]) -> int:
    """Load a checkpoint into the state; returns its iteration."""
    with torch.no_grad():
        for n, p in s.params.items():
            p.copy_(ckpt["params"][n])
    s.opt.load_state_dict(ckpt["optimizer"])
    s.meter.load_state_dict(ckpt["meter"])
    s.gen.set_state(ckpt["generator"])
    torch.set_rng_state(ckpt["torch_rng"])
    s.ema_params = ckpt.get("ema")
    if hasattr(s.methods.advantage, "load_state_dict"):
        s.methods.advantage.load_state_dict(ckpt.get("advantage") or {})
    return int(ckpt["iteration"])


def train_cell(cfg: DictConfig, cell_dir: Path, position: int = 1,
               on_row: Callable[[dict], None] | None = None) -> None:
    """Run (or resume) one cell until its budget; writes metrics.jsonl, eval PNGs, checkpoints; `on_row` sees each
    metrics row once it is on disk (experiment trackers)."""
    cell_dir = Path(cell_dir)
    cell_dir.mkdir(parents=True, exist_ok=True)
    s = build_state(cfg)
    iteration = 0
    ckpt = store.load_checkpoint(cell_dir)
    if ckpt is not None:
        iteration = resume(s, ckpt)
        store.restore_metrics(cell_dir, ckpt)  # its rows: a torn or truncated metrics.jsonl loses none
    else:
        (cell_dir / store.METRICS_FILE).unlink(missing_ok=True)
        with s.meter.phase("eval"):
            row = {"iteration": 0, "nfe": 0, "device_hours": 0.0, "wall_s": 0.0,
                   **s.world.evaluate(s.model, cell_dir / "samples", "0000")}
        store.append_metrics(cell_dir, row)
        if on_row is not None:
            on_row(row)

    bar = tqdm(desc=cell_dir.name, total=cfg.budget.iterations, initial=iteration, position=position,
               leave=False, dynamic_ncols=True, disable=None)
    while not budget_reached(cfg, iteration, s.meter):
        iteration += 1
        nfe_before = s.meter.total_nfe
        row = train_iteration(s, iteration)
        last = budget_reached(cfg, iteration, s.meter)
        if last or eval_due(cfg, iteration, nfe_before, s.meter.total_nfe):
            with s.meter.phase("eval"):
                row.update(s.world.evaluate(s.model, cell_dir / "samples", f"{iteration:04d}"))
        store.append_metrics(cell_dir, row)
        if on_row is not None:
            on_row(row)
        if last or "eval_reward" in row or iteration % int(cfg.checkpoint.every) == 0:
            store.save_checkpoint(cell_dir, checkpoint_state(s, iteration), keep=int(cfg.checkpoint.get("keep", 2)))
        bar.update(1)
        bar.set_postfix(reward=f"{row['train_reward_mean']:.3f}", nfe=s.meter.total_nfe)
    bar.close()
