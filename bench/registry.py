"""Name -> class registries for samplers, estimators, objectives, worlds and rewards."""
from __future__ import annotations

import importlib
import pkgutil
from typing import Callable, Generic, TypeVar

from bench.errors import UnknownChoice

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

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def get(self, name: str) -> T:
        self._load()
        if name not in self._items:
            raise UnknownChoice(self.kind, name, list(self._items))
        return self._items[name]

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._items
