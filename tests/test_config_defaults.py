"""Defaults live in one place: a component's YAML file under experiments/ sets only values that differ from the
defaults its code declares (bench/core/schema.py), and only keys the code declares."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from bench.runner.config import CONFIG_DIR
from bench.runner.launcher_options import LAUNCHER_OPTIONS
from bench.runner.loggers import LOGGER_OPTIONS
from bench.runner.resolve import COMPONENTS
from bench.core.schema import Option


def options_of(group: str, name: str) -> dict[str, Option]:
    if group == "launcher":
        return LAUNCHER_OPTIONS[name]
    if group == "logger":
        return LOGGER_OPTIONS[name]
    return COMPONENTS[group].get(name).options()


def copies_of_defaults(values: dict[str, Any], options: dict[str, Option], prefix: str = "") -> list[str]:
    """Keys whose YAML value equals the code default (a second copy of it), and keys the code does not declare."""
    out = []
    for key, value in values.items():
        if key in ("name", "defaults"):  # defaults: Hydra's list of the files this one extends
            continue
        opt = options.get(key)
        if opt is None:
            out.append(f"{prefix}{key} (not declared)")
        elif opt.fields is not None and isinstance(value, dict):
            out += copies_of_defaults(value, dict(opt.fields), f"{prefix}{key}.")
        elif isinstance(value, str) and "${" in value:
            continue  # an interpolation (e.g. the world's shift) is not a copy of a default
        elif value is not None or opt.nullable:
            try:
                same = opt.check(key, value) == opt.default
            except Exception:  # a bad default in a YAML file fails the composition tests, not this one
                same = False
            if same:
                out.append(f"{prefix}{key}")
    return out


FILES = [(g, p) for g in ("sampler", "estimator", "objective", "advantage", "launcher", "logger", "world")
         for p in sorted((CONFIG_DIR / g).glob("*.yaml")) if p.stem != "plugin"]


@pytest.mark.parametrize("group,path", FILES, ids=[f"{g}/{p.stem}" for g, p in FILES])
def test_yaml_sets_only_what_differs_from_the_code(group: str, path: Path) -> None:
    values = yaml.safe_load(path.read_text()) or {}
    assert copies_of_defaults(values, options_of(group, values.get("name", path.stem))) == []
