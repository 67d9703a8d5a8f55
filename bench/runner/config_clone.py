"""Many DictConfigs of one shape, built fast: a grid's cells differ from each other in a few values (seed, lr,
a derived noise seed), and OmegaConf.create validates and wraps every value anew (ms per cell config, most of
the cost of expanding a grid). A config of a shape seen before is a copy of the earlier one (unpickled: a
fraction of create's cost) with the differing values set; anything else is created as usual.

The result is the config OmegaConf.create would give: the same keys in the same order, the same values (set the
way create sets them), no flags.
"""
from __future__ import annotations

import pickle
from typing import Any

from omegaconf import DictConfig, OmegaConf

_SCALARS = (bool, int, float, str, type(None))
Path = tuple[Any, ...]


def _same(a: Any, b: Any) -> bool:
    """Equal and of the same types throughout (1, 1.0 and True are equal in Python, not in a config)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    return a == b


def _settable(v: Any) -> bool:
    """A value that assignment stores exactly as create does: scalars and lists of them."""
    return isinstance(v, _SCALARS) or (isinstance(v, list) and all(_settable(x) for x in v))


def _changes(old: Any, new: Any, path: Path = ()) -> list[tuple[Path, Any]] | None:
    """The leaves of `new` that differ from `old` (path, value), or None if the two differ in shape (keys, key
    order, a mapping against a leaf) or in a value assignment would not store as create does."""
    if isinstance(old, dict) and isinstance(new, dict):
        if list(old) != list(new):
            return None
        out: list[tuple[Path, Any]] = []
        for k in new:
            sub = _changes(old[k], new[k], (*path, k))
            if sub is None:
                return None
            out += sub
        return out
    if isinstance(old, dict) or isinstance(new, dict) or not path:
        return None
    if _same(old, new):
        return []
    return [(path, new)] if _settable(new) and _settable(old) else None


def _shape(d: Any) -> Any:
    return tuple((k, _shape(v)) for k, v in d.items()) if isinstance(d, dict) else None


class ConfigFactory:
    """DictConfigs from plain dicts, each shape's first one kept as the template of the next."""

    def __init__(self) -> None:
        self._seen: dict[Any, tuple[dict[str, Any], bytes]] = {}

    def clear(self) -> None:
        self._seen.clear()

    def make(self, values: dict[str, Any]) -> DictConfig:
        """OmegaConf.create(values), built from an earlier config of the same shape where there is one."""
        shape = _shape(values)
        earlier = self._seen.get(shape)
        changes = _changes(earlier[0], values) if earlier is not None else None
        if changes is None:
            cfg = OmegaConf.create(values)
            self._seen[shape] = (pickle.loads(pickle.dumps(values)), pickle.dumps(cfg))
            return cfg
        cfg = pickle.loads(earlier[1])
        for path, value in changes:
            node = cfg
            for key in path[:-1]:
                node = node[key]
            node[path[-1]] = value
        return cfg
