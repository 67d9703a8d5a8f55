"""Hydra composition of cell configs from experiments/, with one-line errors for bad names."""
from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from bench.errors import UnknownChoice, UserError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "experiments"
GROUPS = ("world", "sampler", "estimator", "objective", "advantage", "grid", "method", "launcher", "logger")


def group_options(group: str) -> list[str]:
    d = CONFIG_DIR / group
    return sorted(p.stem for p in d.glob("*.yaml")) if d.is_dir() else []


def split_override(item: str) -> tuple[str, str]:
    if "=" not in item:
        raise UserError(f"bad override '{item}'; expected key=value (e.g. grid=smoke, train.lr=1e-4)")
    key, value = item.split("=", 1)
    return key.lstrip("+~"), value


def check_group_choice(group: str, value: str) -> None:
    if group in GROUPS and value not in ("null",) and value not in group_options(group):
        raise UnknownChoice(group, value, group_options(group))


def validate_overrides(overrides: list[str]) -> None:
    for item in overrides:
        key, value = split_override(item)
        check_group_choice(key, value)


def compose_config(overrides: list[str]) -> DictConfig:
    """The resolved config for these overrides (Hydra's defaults lists, groups and override grammar)."""
    validate_overrides(overrides)
    if not GlobalHydra.instance().is_initialized():
        initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None, job_name="bench")
    try:
        return compose(config_name="config", overrides=list(overrides))
    except Exception as e:  # Hydra's own messages are multi-line; keep the first line
        raise UserError(f"bad config overrides {' '.join(overrides)}: {str(e).splitlines()[0]}") from e
