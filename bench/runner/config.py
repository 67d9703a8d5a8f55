"""Hydra composition of cell configs from experiments/, with one-line errors for bad names."""
from __future__ import annotations

import re
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from bench.core.errors import UnknownChoice, UserError

CONFIG_DIR = Path(__file__).resolve().parents[2] / "experiments"
GROUPS = ("world", "sampler", "estimator", "objective", "advantage", "grid", "method", "launcher", "logger")


def derived_seed(seed: int, stream: int) -> int:
    """A seed for another random stream of the same run (`${derived_seed:${seed},1234}` in a config): distinct
    per (seed, stream) and far from the run's own generator, whose first draws it would otherwise repeat."""
    return (int(seed) * 1_000_003 + int(stream) * 7919 + 12345) % 2**31


OmegaConf.register_new_resolver("derived_seed", derived_seed, replace=True)


def group_options(group: str) -> list[str]:
    d = CONFIG_DIR / group
    return sorted(p.stem for p in d.glob("*.yaml")) if d.is_dir() else []


def split_override(item: str) -> tuple[str, str]:
    if "=" not in item:
        raise UserError(f"bad override '{item}'; expected key=value (e.g. grid=smoke, train.lr=1e-4)")
    key, value = item.split("=", 1)
    return key.lstrip("+~"), value


PLUGIN_GROUPS = ("world", "sampler", "estimator", "objective", "advantage")


def is_plugin(group: str, value: str) -> bool:
    """`group=module:Class`: a component from the user's own module (bench/core/registry.py)."""
    return group in PLUGIN_GROUPS and ":" in str(value)


def check_group_choice(group: str, value: str) -> None:
    if group in GROUPS and value not in ("null",) and value not in group_options(group) and not is_plugin(group, value):
        raise UnknownChoice(group, value, group_options(group))


def expand_plugins(overrides: list[str]) -> list[str]:
    """`sampler=my_mod:MySampler` -> `sampler=plugin sampler.name=my_mod:MySampler` (each group's plugin.yaml holds
    only what every component of the group reads from elsewhere, e.g. the world's time shift)."""
    out = []
    for item in overrides:
        key, value = split_override(item)
        out += [f"{key}=plugin", f"{key}.name={value}"] if is_plugin(key, value) else [item]
    return out


def validate_overrides(overrides: list[str]) -> None:
    for item in overrides:
        key, value = split_override(item)
        check_group_choice(key, value)


def compose_config(overrides: list[str]) -> DictConfig:
    """The resolved config for these overrides (Hydra's defaults lists, groups and override grammar)."""
    validate_overrides(overrides)
    if not GlobalHydra.instance().is_initialized():
        initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None, job_name="bench")
    overrides = expand_plugins(list(overrides))
    for _ in range(len(overrides) + 1):
        try:
            return compose(config_name="config", overrides=overrides)
        except Exception as e:  # Hydra's own messages are multi-line; keep the first line
            first = str(e).splitlines()[0]
            missing = re.match(r"Could not override '([^']+)'", first)
            # A key no YAML file has: add it (+key=value), so the typed schema names the nearest valid key.
            if missing and f"{missing.group(1)}=" in " ".join(overrides):
                overrides = [f"+{o}" if split_override(o)[0] == missing.group(1) and not o.startswith("+") else o
                             for o in overrides]
                continue
            raise UserError(f"bad config overrides {' '.join(overrides)}: {first}") from e
    raise UserError(f"bad config overrides {' '.join(overrides)}")
