"""Hydra compositions kept across processes, so a rerun of a finished grid does not compose its ~100 configs again
(about 0.1 s each, most of a rerun's time).

An entry is the pickled composed config of one override list, filed under a digest of everything a composition
depends on: the contents and paths of every YAML file under experiments/, the override list, and the versions of
Hydra, OmegaConf and Python. An edited config file is a new digest, so an entry is never read for configs other
than its own. Failed compositions are not kept (their errors come from Hydra every time). The cache lives in
$DIFFRL_CACHE_DIR/compose (default ~/.cache/diffrl-bench/compose; DIFFRL_CACHE_DIR=off disables it); a cache
that cannot be read or written is skipped, never an error.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import sys
import tempfile
from pathlib import Path

import hydra
import omegaconf
from omegaconf import DictConfig

from bench.runner.config import CONFIG_DIR, compose_config

KEEP_DIGESTS = 8  # older config states are pruned: each holds one entry per composed override list
_digest_memo: dict[tuple, str] = {}


def cache_root() -> Path | None:
    """The folder entries live in, or None when caching is off."""
    env = os.environ.get("DIFFRL_CACHE_DIR")
    if env is not None and env.strip().lower() in ("", "off", "0", "none"):
        return None
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "diffrl-bench"
    return base / "compose"


def _yaml_files() -> list[Path]:
    return sorted(p for p in CONFIG_DIR.rglob("*.yaml") if p.is_file())


def configs_digest() -> str:
    """The digest of the config files' contents (read again whenever a file's size or mtime changes)."""
    files = _yaml_files()
    stats = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    if stats not in _digest_memo:
        h = hashlib.sha256(json.dumps([str(CONFIG_DIR), hydra.__version__, omegaconf.__version__,
                                       sys.version]).encode())
        for p in files:
            h.update(str(p.relative_to(CONFIG_DIR)).encode() + b"\0" + p.read_bytes() + b"\0")
        _digest_memo.clear()
        _digest_memo[stats] = h.hexdigest()[:24]
    return _digest_memo[stats]


def forget() -> None:
    """Re-read every config file at the next lookup (a new grid expansion: files may have been edited)."""
    _digest_memo.clear()


def composed_bytes(overrides: tuple[str, ...]) -> bytes:
    """The pickled composed config of `overrides` (compose_config's, with its errors), from the cache if there."""
    root = cache_root()
    if root is None:
        return pickle.dumps(compose_config(list(overrides)))
    digest = configs_digest()
    path = root / digest / (hashlib.sha256(json.dumps(list(overrides)).encode()).hexdigest()[:32] + ".pkl")
    try:
        data = path.read_bytes()
        pickle.loads(data)  # a damaged entry is a miss
        return data
    except Exception:  # noqa: BLE001 (missing, unreadable or damaged: compose instead)
        pass
    data = pickle.dumps(compose_config(list(overrides)))
    if configs_digest() == digest:  # a file edited while composing: keep nothing under the old digest
        store_entry(path, data)
    return data


def compose_cached(overrides: list[str]) -> DictConfig:
    """compose_config(overrides), from the cache when these files and overrides were composed before."""
    return pickle.loads(composed_bytes(tuple(overrides)))


def store_entry(path: Path, data: bytes) -> None:
    """Write one entry atomically (a concurrent reader sees all of it or nothing); failures are ignored."""
    try:
        new_state = not path.parent.is_dir()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)  # atomic: a concurrent reader sees the whole entry or none
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        if new_state:
            _prune(path.parent.parent)
    except OSError:
        pass


def _prune(root: Path) -> None:
    def mtime(p: Path) -> float:
        try:
            return p.stat().st_mtime
        except OSError:
            return 0.0
    states = sorted((p for p in root.iterdir() if p.is_dir()), key=mtime, reverse=True)
    for old in states[KEEP_DIGESTS:]:
        shutil.rmtree(old, ignore_errors=True)
