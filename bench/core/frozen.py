"""A plain read-only view of a resolved config for the training loop's hot path.

OmegaConf's attribute access costs ~15 us a key (node lookup, interpolation, type checks); the loop reads a dozen
keys per minibatch. Converted once per cell, the same `cfg.train.lr` / `cfg.train.get("k", d)` reads are dict lookups.
"""
from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf


class FrozenConfig(dict):
    """A dict whose keys also read as attributes (nested mappings too); never written after construction."""

    __slots__ = ()

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(f"config has no key '{key}'") from None

    def __setattr__(self, key: str, value: Any) -> None:
        raise TypeError("FrozenConfig is read-only")


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return FrozenConfig({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return [_freeze(v) for v in value]
    return value


def frozen(cfg: DictConfig | dict) -> FrozenConfig:
    """`cfg` resolved into nested FrozenConfigs (lists stay lists)."""
    return _freeze(OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg))
