"""Builds a cell's world, sampler, estimator, objective and advantage from its config."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from bench.worlds import WORLDS
from bench.worlds.base import check_device
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
    spec = cfg.world.get("reward", None)
    names = [spec] if isinstance(spec, str) else list(plain(spec)) if spec is not None else []
    for name in names:
        REWARDS.get(str(name))
    build_methods(cfg)
