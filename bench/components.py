"""Builds a cell's world, sampler, estimator, objective and advantage from its config."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from bench.worlds import WORLDS
from estimators import ESTIMATORS
from objectives import ADVANTAGES, OBJECTIVES
from samplers import SAMPLERS


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
    return reason


def build_world(cfg: DictConfig):
    cache = Path(cfg.results_dir) / "cache"
    return WORLDS.get(cfg.world.name)(plain(cfg.world), cache)


def validate_cell(cfg: DictConfig) -> None:
    """Fail fast, before any training, on names no registry knows (world, reward, methods)."""
    from bench.rewards import REWARDS

    world_cls = WORLDS.get(cfg.world.name)
    if hasattr(world_cls, "preflight"):  # cheap checks a world can make up front (sd3: are the weights there?)
        world_cls.preflight(plain(cfg.world))
    spec = cfg.world.get("reward", None)
    names = [spec] if isinstance(spec, str) else list(plain(spec)) if spec is not None else []
    for name in names:
        REWARDS.get(str(name))
    build_methods(cfg)
