"""Name -> class registries for samplers, estimators, objectives, worlds and rewards.

Besides the package's own entries, a registry finds plugins: a name `module:attribute` (a class in any importable
module, e.g. `my_lab.samplers:LangevinSampler`) or an entry point in the group `diffrl_bench.<kind>` of an
installed distribution. Plugins resolve by name in every process, so they work under every launcher."""
from __future__ import annotations

import importlib
import importlib.metadata
import pkgutil
from typing import Callable, Generic, TypeVar

from bench.core.errors import UnknownChoice, UserError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps config names to implementations; adding a method is adding a decorated file."""

    def __init__(self, kind: str, package: str | None = None):
        self.kind = kind
        self._package = package
        self._items: dict[str, T] = {}
        self._loaded = package is None

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} '{name}' registered twice")
            self._items[name] = obj
            return obj

        return deco

    def _load(self) -> None:
        # Importing every module of the package lets each file register itself,
        # so a new method never needs an edit to a central list.
        if self._loaded:
            return
        self._loaded = True
        pkg = importlib.import_module(self._package)
        for info in pkgutil.iter_modules(pkg.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{self._package}.{info.name}")

    def _entry_points(self) -> dict[str, importlib.metadata.EntryPoint]:
        return {ep.name: ep for ep in importlib.metadata.entry_points(group=f"diffrl_bench.{self.kind}")}

    def names(self) -> list[str]:
        self._load()
        return sorted({*self._items, *self._entry_points()})

    def _plugin(self, name: str) -> T:
        module, _, attr = name.partition(":")
        try:
            obj = getattr(importlib.import_module(module), attr)
        except ImportError as e:
            raise UserError(f"{self.kind}={name}: cannot import module '{module}' ({e}); valid: an importable "
                            "module:Class (is its folder on PYTHONPATH?)") from None
        except AttributeError:
            raise UserError(f"{self.kind}={name}: module '{module}' has no '{attr}'; valid: module:Class") from None
        self._items[name] = obj
        return obj

    def get(self, name: str) -> T:
        self._load()
        if name in self._items:
            return self._items[name]
        if ":" in name:
            return self._plugin(name)
        eps = self._entry_points()
        if name in eps:
            self._items[name] = eps[name].load()
            return self._items[name]
        raise UnknownChoice(self.kind, name, self.names())

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._items or ":" in name or name in self._entry_points()
