"""Resolved cell configs kept across processes, so a rerun of a finished grid does not resolve its ~250 cells
against their schemas again (OmegaConf's resolution of a whole config is most of what planning a grid costs).

An entry is one cell's plain resolved values and the keys left out as another member's (what
bench.runner.resolve.resolved_values returns for one template of overrides and one seed), filed under a digest
of everything those values depend on: the config files (compose_cache.configs_digest), the contents of every
Python file of the suite's own packages (the schemas, defaults and resolvers live in code), the environment
variables the config files read (`${oc.env:NAME,...}`) and the override list with the seed. A cell whose
components come from outside the suite (a `module:Class` plugin or an entry point) is never kept: its code is not
in the digest. Errors are not kept either (resolution raises them every time). The cache shares its root with
compose_cache ($DIFFRL_CACHE_DIR; DIFFRL_CACHE_DIR=off disables both) and is skipped, never an error, when it
cannot be read or written.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
from pathlib import Path
from typing import Any, Callable

from bench.runner import compose_cache
from bench.runner.config import CONFIG_DIR
from bench.runner.resolve import COMPONENTS

Resolved = tuple[dict[str, Any], dict[str, list[str]]]  # (plain values, inapplicable key -> members)
PACKAGES = ("bench", "samplers", "estimators", "objectives")
ROOT = Path(__file__).resolve().parents[2]
_ENV_REFERENCE = re.compile(r"oc\.env:\s*([A-Za-z_][A-Za-z0-9_]*)")
_memo: dict[tuple, tuple[str, list[str]]] = {}
_current: list[str] = []  # this expansion's digest


def _code_files() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py") if p.is_file())


def _env_names() -> list[str]:
    names = set()
    for p in sorted(CONFIG_DIR.rglob("*.yaml")):
        names.update(_ENV_REFERENCE.findall(p.read_text()))
    return sorted(names)


def forget() -> None:
    """Look at the files again at the next state_digest (a new grid expansion: files may have been edited)."""
    _current.clear()


def state_digest(fresh: bool = False) -> str:
    """The digest of the config files, the suite's code and the environment variables the configs read: computed
    once per grid expansion (forget()), or again with `fresh` (files are re-read when a size or mtime changed)."""
    if _current and not fresh:
        return _current[0]
    files = _code_files()
    stats = (compose_cache.configs_digest(), tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files))
    if stats not in _memo:
        h = hashlib.sha256(stats[0].encode())
        for p in files:
            h.update(str(p.relative_to(ROOT)).encode() + b"\0" + p.read_bytes() + b"\0")
        _memo.clear()
        _memo[stats] = (h.hexdigest(), _env_names())
    code, names = _memo[stats]
    env = {name: os.environ.get(name) for name in names}
    digest = hashlib.sha256((code + json.dumps(env, sort_keys=True)).encode()).hexdigest()[:24]
    _current[:] = [digest]
    return digest


def _own_components(values: dict[str, Any]) -> bool:
    """Every component of the cell is a class of the suite's own packages (else its code is not in the digest)."""
    for group, registry in COMPONENTS.items():
        name = str((values.get(group) or {}).get("name", ""))
        if ":" in name or registry.get(name).__module__.split(".")[0] not in PACKAGES:
            return False
    return True


def resolved_cell(template: tuple[str, ...], seed: int, resolve: Callable[[], Resolved]) -> Resolved:
    """resolve() for the cell of these overrides and seed, from the cache when it was resolved before under the
    same configs, code and environment; each call gets its own copy."""
    root = compose_cache.cache_root()
    if root is None:
        return resolve()
    digest = state_digest()
    key = hashlib.sha256(json.dumps([list(template), int(seed)]).encode()).hexdigest()[:32]
    path = root.parent / "resolved" / digest / f"{key}.pkl"
    try:
        return pickle.loads(path.read_bytes())
    except Exception:  # noqa: BLE001 (missing, unreadable or damaged: resolve instead)
        pass
    out = resolve()
    if _own_components(out[0]) and state_digest(fresh=True) == digest:  # nothing edited while resolving
        compose_cache.store_entry(path, pickle.dumps(out))
    return out
