"""Builds a cell's world, sampler, estimator, objective and advantage from its config."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

from bench.worlds import WORLDS
from bench.worlds.base import check_device
from bench.training.preflight import check_training
from estimators import ESTIMATORS
from objectives import ADVANTAGES, OBJECTIVES
from samplers import SAMPLERS
from bench.rewards import REWARDS


def plain(cfg: Any) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


@dataclass
class Components:
    sampler: Any
    estimator: Any
    objective: Any
    advantage: Any


def build_methods(cfg: DictConfig) -> Components:
    """The three interchangeable modules (plus the advantage scheme), looked up by name."""
    return Components(
        sampler=SAMPLERS.get(cfg.sampler.name)(plain(cfg.sampler)),
        estimator=ESTIMATORS.get(cfg.estimator.name)(plain(cfg.estimator)),
        objective=OBJECTIVES.get(cfg.objective.name)(plain(cfg.objective)),
        advantage=ADVANTAGES.get(cfg.advantage.name)(plain(cfg.advantage)),
    )


def incompatibility(cfg: DictConfig) -> str | None:
    """Why this combination cannot work (reported as a skipped cell), or None."""
    c = build_methods(cfg)
    reason = c.estimator.incompatibility(c.sampler)
    if reason is None and hasattr(c.objective, "incompatibility"):
        reason = c.objective.incompatibility(c.sampler, c.estimator)
    if reason is None and c.sampler.shares_prefixes and not c.estimator.final_sample \
            and not getattr(c.advantage, "backs_up_trees", False):
        reason = (f"advantage '{cfg.advantage.name}' would give each shared edge of sampler '{cfg.sampler.name}' "
                  "the advantage of one arbitrary leaf below it; use advantage=tree")
    if reason is None:  # model families (DESIGN section 3): flow kernels and losses do not apply to VP models
        family = getattr(WORLDS.get(cfg.world.name), "family_name", "flow")
        reason = c.sampler.family_incompatibility(family)
        if reason is None and family != "flow" and c.objective.on_noised_samples:
            reason = (f"objective '{cfg.objective.name}' regresses flow velocities (objectives/matching.py); "
                      f"the world's model is {family}")
    return reason


def build_world(cfg: DictConfig):
    cache = Path(cfg.results_dir) / "cache"
    return WORLDS.get(cfg.world.name)(plain(cfg.world), cache)


def validate_cell(cfg: DictConfig, check_files: bool = True) -> None:
    """Fail fast, before any training, on names no registry knows (world, reward, methods), on a device that is
    not there and (`check_files`) on model weights or prompt files that are missing."""
    world_cls = WORLDS.get(cfg.world.name)
    if check_files:
        check_device(cfg.world.get("device"))
    if check_files and hasattr(world_cls, "preflight"):  # cheap checks up front (sd3: are the weights there?)
        world_cls.preflight(plain(cfg.world))
    world = plain(cfg.world)
    options = dict(world.get("reward_options") or {})
    for name in reward_names(world):
        reward_cls = REWARDS.get(name)
        if check_files and hasattr(reward_cls, "preflight"):  # each reward checks the paths it will load
            reward_cls.preflight(dict(options.get(name) or {}))
    if check_files:  # accelerate's --mixed_precision agrees with the cell's; train.init_lora is a LoRA file
        check_training(cfg.train)
    build_methods(cfg)


def reward_names(world: Mapping[str, Any]) -> list[str]:
    """Every reward a cell of this world builds: the training reward's parts and world.eval.reward's."""
    names: list[str] = []
    for spec in (world.get("reward"), dict(world.get("eval") or {}).get("reward")):
        for name in ([spec] if isinstance(spec, str) else list(spec) if isinstance(spec, Mapping) else []):
            if str(name) not in names:
                names.append(str(name))
    return names


_ENV_FALLBACK = re.compile(r"\$\{oc\.env:([A-Za-z_][A-Za-z0-9_]*),([^}]*)\}")


def fallback_warnings(cfg: DictConfig) -> list[str]:
    """One line per world.prompts entry that falls back to its default because its environment variable is unset
    (the sd35_* grids read DIFFRL_GENEVAL_TRAIN, DIFFRL_HPD_TRAIN, ...): naming the variable to set."""
    prompts = cfg.get("world", {}).get("prompts") if isinstance(cfg.get("world"), DictConfig) else None
    if not isinstance(prompts, DictConfig):
        return []
    out = []
    for key, raw in OmegaConf.to_container(prompts, resolve=False).items():
        for var, default in _ENV_FALLBACK.findall(str(raw)):
            if var not in os.environ and default.strip() not in ("null", ""):
                out.append(f"warning: {var} is unset, so world.prompts.{key} falls back to the shipped "
                           f"{default.strip()} (a plumbing check, not the benchmark); set {var}=/path/to/prompts")
    return out
