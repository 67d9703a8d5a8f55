"""The training loop of one cell, top to bottom: rollout -> reward -> advantages -> estimator -> objective."""
from __future__ import annotations


import shutil
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
from bench.core.frozen import frozen
from bench.core.meter import ComputeMeter
from bench.training.ema import EvalEMA, ema_decay, ema_update, optimizer_steps
from bench.training.micro_batch import StepStats, check_evaluations, micro_batches, weighted_loss
from bench.training.precision import Precision, check_launch
from bench.core.policy import Policy, PolicyCall
from bench.runner.resolve import resolve_cell
from bench.worlds.sd3_lora_export import export_lora, exportable, init_from_lora

from objectives.filtering import drop_zero_advantage
from objectives.kl import kl_penalty

TIMING_KEYS = ("iter_wall_s", "wall_s", "device_s", "device_hours", "peak_mem_mb", "rollout_s", "reward_s", "train_s",
               "eval_s")


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


def until_done(cfg: DictConfig, meter: ComputeMeter, crossed: bool) -> bool:
    """budget.until: the run may stop once an eval reached the value, or at the cap (always true without it)."""
    until = cfg.budget.get("until")
    return until is None or crossed or meter.total_nfe >= int(until.cap_nfe)


def crossed_until(cfg: DictConfig, row: dict[str, Any]) -> bool:
    """Did this eval row reach budget.until's value (False without budget.until or an eval)?"""
    until = cfg.budget.get("until")
    return until is not None and until.metric in row and float(row[until.metric]) >= float(until.value)


def eval_due(cfg: DictConfig, iteration: int, nfe_before: int, nfe_after: int) -> bool:
    """Does the eval schedule fall in this iteration: a multiple of eval.every_nfe crossed (else of eval.every
    reached), the period times eval.late_factor once the NFE before it passed eval.late_from_nfe."""
    late_from = cfg.eval.get("late_from_nfe")
    factor = int(cfg.eval.get("late_factor", 1)) if late_from is not None and nfe_before >= late_from else 1
    every_nfe = cfg.eval.get("every_nfe")
    if every_nfe:
        period = int(every_nfe) * factor
        return nfe_after // period > nfe_before // period
    return iteration % (int(cfg.eval.every) * factor) == 0


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
    precision: Precision
    eval_ema: EvalEMA | None = None  # train.eval_ema: the weights evaluation uses, when on


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
    ref_params = policy.snapshot()  # before train.init_lora: the reference stays the base model
    if cfg.train.get("init_lora"):
        init_from_lora(policy, cfg.train.init_lora)
    precision = Precision(str(cfg.train.get("mixed_precision", "no")), world.device)
    check_launch(precision.mode)
    precision.check(policy)
    # foreach: one kernel per op over all parameters instead of a Python loop over them. Not fused, though it is
    # 0.3 ms a step faster on the digits MLP (bench.perf): it rounds some weights differently in the last bit,
    # and over a headline run that moved one seed's crossing past the budget (2 -> 1 of 5 stepwise+EPG runs reached 0.9).
    opt = torch.optim.AdamW(params.values(), lr=float(cfg.train.lr), weight_decay=float(cfg.train.weight_decay),
                            foreach=True)
    meter = distributed.make_meter(world.device)  # one process: ComputeMeter(num_devices=1)
    ema_params = policy.snapshot() if cfg.train.old_policy == "ema" else None
    model = precision.policy_call(policy, meter, m.sampler.guidance, bool(cfg.train.detach_uncond))
    eval_ema = cfg.train.get("eval_ema")
    # The loop reads cfg per minibatch: a plain frozen copy (bench/core/frozen.py), not OmegaConf nodes.
    return CellState(frozen(cfg), world, m, policy, params, opt, meter, model,
                     gen, ref_params, ema_params,
                     ema_params is not None and cfg.train.get("sampling_policy", "current") == "old", precision,
                     None if eval_ema is None else EvalEMA(params, eval_ema.decay, eval_ema.every))


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
                # One optimizer step per minibatch; train.micro_batch splits its forward/backward (tree siblings
                # together), each micro-batch's loss weighted so the gradients add up to the minibatch's.
                s.opt.zero_grad(set_to_none=True)
                step_stats = StepStats()
                for micro in micro_batches(mb, cfg.train.get("micro_batch"), groups):
                    mu = micro.idx
                    with timed("est_forward"):
                        est = m.estimator.estimate(model, rollout, units[mu], {k: v[mu] for k, v in draws.items()})
                        # Before the first optimizer step the current policy *is* the sampling policy: reuse its
                        # value exactly (a stored or batch-recomputed value differs in the last bits): ratio 1.
                        fresh = s.ema_params is None and not stepped
                        if m.objective.on_noised_samples:  # nft, awm: v_old per minibatch, no log-likelihood
                            model_old = None if fresh else model.with_params(old_params)
                            loss, stats = m.objective.sample_loss(est, rollout.x[units[mu]], adv[mu], model_old)
                        else:
                            if fresh:
                                logp_old_all[mu], known[mu] = est.logp.detach(), True
                            missing = mu[~known[mu]]
                            if len(missing):
                                logp_old_all[missing] = m.estimator.old_logp(
                                    model.with_params(old_params), rollout, units[missing],
                                    {k: v[missing] for k, v in draws.items()}, gen, is_sampling).to(logp_old_all.dtype)
                                known[missing] = True
                            loss, stats = m.objective.loss(est.logp, logp_old_all[mu], adv[mu])
                        kl = None
                        if cfg.train.kl_coef:
                            check_evaluations(micro, len(est.v))
                            kl = kl_penalty(cfg.train.get("kl_type", "velocity"), est,
                                            model.with_params(s.ref_params), rollout, units[mu])
                            stats["kl"] = kl.item()
                        loss = weighted_loss(loss, kl, float(cfg.train.kl_coef), micro)
                    check_finite("loss", loss, iteration)
                    with timed("est_backward"):
                        s.precision.backward(loss)
                    step_stats.add(stats, loss.item(), micro)
                with timed("optimizer"):
                    grad_norm = s.precision.clip(s.opt, s.params.values(), float(cfg.train.max_grad_norm))
                    if not s.precision.skips_bad_steps:  # fp16: the GradScaler skips a non-finite step instead
                        check_finite("gradients", grad_norm, iteration)  # before the step: weights stay finite
                    s.precision.step(s.opt)
                if s.eval_ema is not None:
                    s.eval_ema.step(s.params)
                stepped = True
                step_stats.values["grad_norm"] = grad_norm.item()
                for k, v in step_stats.values.items():
                    stats_acc.setdefault(k, []).append(v)
    if s.ema_params is not None:
        ema_update(s.ema_params, s.params, ema_decay(cfg.train, iteration, optimizer_steps(s.opt)))

    # 5. The row: compute figures and training statistics.
    row = {"iteration": iteration, **meter.end_iteration()}
    row.update({k: (min(v) if k == "ratio_min" else max(v) if k == "ratio_max" else sum(v) / len(v))
                for k, v in stats_acc.items()})
    all_rewards = distributed.all_gather(rollout.reward)  # every rank's rewards (this rank's in one process)
    row.update(train_reward_mean=all_rewards.mean().item(), train_reward_std=all_rewards.std().item(),
               num_units=len(units), num_samples=len(rollout.leaves), optimizer_steps=optimizer_steps(s.opt))
    return row


def eval_model(s: CellState) -> PolicyCall:
    """The policy evaluation sees: the EMA weights under train.eval_ema, else the current ones."""
    return s.model if s.eval_ema is None else s.model.with_params(s.eval_ema.weights)


LORA_DIR = "lora"


def write_lora(s: CellState, cell_dir: Path, iteration: int) -> Path | None:
    """checkpoint.export_lora: the evaluated weights as <cell>/lora/lora-<iteration>.safetensors, in the format
    diffusers' load_lora_weights reads (rank 0 only; None for a world without a LoRA policy)."""
    if not s.cfg.checkpoint.get("export_lora", True) or not exportable(s.policy) or not distributed.is_main():
        return None
    weights = None if s.eval_ema is None else s.eval_ema.weights
    return export_lora(s.policy, Path(cell_dir) / LORA_DIR / f"lora-{iteration:04d}.safetensors", weights)


def checkpoint_state(s: CellState, iteration: int) -> dict[str, Any]:
    """What a resume needs: weights, optimizer, meter, random streams, EMA, advantage statistics."""
    m = s.methods
    return {"iteration": iteration, "params": s.policy.snapshot(), "optimizer": s.opt.state_dict(),
            "meter": s.meter.state_dict(), "generator": s.gen.get_state(), "torch_rng": torch.get_rng_state(),
            "ema": s.ema_params, "advantage": m.advantage.state_dict() if hasattr(m.advantage, "state_dict") else None,
            "grad_scaler": s.precision.state_dict(),
            "eval_ema": s.eval_ema.state_dict() if s.eval_ema is not None else None}


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
    s.precision.load_state_dict(ckpt.get("grad_scaler"))
    if s.eval_ema is not None and ckpt.get("eval_ema") is not None:
        s.eval_ema.load_state_dict(ckpt["eval_ema"])
    if hasattr(s.methods.advantage, "load_state_dict"):
        s.methods.advantage.load_state_dict(ckpt.get("advantage") or {})
    return int(ckpt["iteration"])


def train_cell(cfg: DictConfig, cell_dir: Path, position: int = 1,
               on_row: Callable[[dict], None] | None = None, base_eval: dict[str, Any] | None = None) -> None:
    """Run (or resume) one cell until its budget; writes metrics.jsonl, eval PNGs, checkpoints; `on_row` sees each
    metrics row once it is on disk (experiment trackers). `base_eval` ({"metrics", "samples"}: the grid's base-model
    eval of the same world, bench.runner.base_eval.reusable_base_eval) is iteration 0's eval instead of running it."""
    cell_dir = Path(cell_dir)
    cell_dir.mkdir(parents=True, exist_ok=True)
    s = build_state(cfg)
    cfg = s.cfg  # the frozen copy: the loop below reads budget/eval keys every iteration
    iteration = 0
    ckpt = store.load_checkpoint(cell_dir)
    if ckpt is not None:
        iteration = resume(s, ckpt)
        store.restore_metrics(cell_dir, ckpt)  # its rows: a torn or truncated metrics.jsonl loses none
    else:
        (cell_dir / store.METRICS_FILE).unlink(missing_ok=True)
        if base_eval is not None:  # the untrained policy is the base model: its figures (and sheets) are the grid's
            row = {"iteration": 0, "nfe": 0, "device_hours": 0.0, "wall_s": 0.0, **base_eval["metrics"]}
            for sheet in base_eval.get("samples", []):
                (cell_dir / "samples").mkdir(parents=True, exist_ok=True)
                shutil.copyfile(sheet, cell_dir / "samples" / Path(sheet).name.replace("_base.", "_0000."))
        else:
            with s.meter.phase("eval"):
                row = {"iteration": 0, "nfe": 0, "device_hours": 0.0, "wall_s": 0.0,
                       **s.world.evaluate(eval_model(s), cell_dir / "samples", "0000")}
        store.append_metrics(cell_dir, row)
        if on_row is not None:
            on_row(row)

    # The fixed budget ends the run unless budget.until keeps it going (to a first crossing or the cap); the
    # report reads final figures at the budget's eval and first crossings over the whole run.
    crossed = any(crossed_until(cfg, r) for r in store.read_metrics(cell_dir))
    bar = tqdm(desc=cell_dir.name, total=cfg.budget.iterations, initial=iteration, position=position,
               leave=False, dynamic_ncols=True, disable=None)
    while not (budget_reached(cfg, iteration, s.meter) and until_done(cfg, s.meter, crossed)):
        iteration += 1
        nfe_before = s.meter.total_nfe
        in_budget = not budget_reached(cfg, iteration - 1, s.meter)  # the meter has not moved yet
        row = train_iteration(s, iteration)
        spent = budget_reached(cfg, iteration, s.meter)
        # Evals at the schedule, where the budget runs out (the final figures) and where the run ends.
        if (in_budget and spent) or (spent and until_done(cfg, s.meter, crossed)) or eval_due(
                cfg, iteration, nfe_before, s.meter.total_nfe):
            with s.meter.phase("eval"):
                row.update(s.world.evaluate(eval_model(s), cell_dir / "samples", f"{iteration:04d}"))
            row["eval_s"] = s.meter.current.phase_s["eval"]  # eval time, apart from the iteration's wall_s
            write_lora(s, cell_dir, iteration)
            crossed = crossed or crossed_until(cfg, row)
        last = budget_reached(cfg, iteration, s.meter) and until_done(cfg, s.meter, crossed)
        store.append_metrics(cell_dir, row)
        if on_row is not None:
            on_row(row)
        if last or "eval_reward" in row or iteration % int(cfg.checkpoint.every) == 0:
            store.save_checkpoint(cell_dir, checkpoint_state(s, iteration), keep=int(cfg.checkpoint.get("keep", 2)))
        bar.update(1)
        bar.set_postfix(reward=f"{row['train_reward_mean']:.3f}", nfe=s.meter.total_nfe)
    bar.close()
