"""`python -m bench.run --help`: the grids, the config groups and their choices, and a grid's axes."""
from __future__ import annotations

from pathlib import Path

import yaml

from bench.runner.config import CONFIG_DIR, GROUPS, group_options, split_override
from bench.runner.launcher_options import LAUNCHER_OPTIONS
from bench.runner.loggers import LOGGER_OPTIONS
from bench.runner.resolve import COMPONENTS
from bench.training.train_options import CELL_OPTIONS
from bench.core.schema import Option, fmt

USAGE = """usage: python -m bench.run grid=NAME [key=value ...] [--cfg job | --dry-run] [--help]

  key=value        any config value (Hydra override grammar), e.g. train.lr=1e-4 budget.nfe=400000
  group=choice     pick a config group's file, e.g. estimator=elbo; naming an axis restricts it to that value
  key=a,b          a sweep: becomes a grid axis with these values (estimator=elbo,stepwise train.lr=1e-4,3e-4)
  --cfg job        print every cell's resolved config and whether it would run, resume or be reused; run nothing
  --dry-run        the same without the configs
  --help           this text; with grid=NAME also that grid's axes, seeds and baseline; with group=choice
                   (sampler=tree, launcher=slurm, train) every option of it: default, valid values, meaning

A rerun reuses finished cells of the same config and resumes unfinished ones; a results folder never mixes
cells of different configs (give another results_dir= for a changed config).
Exit codes: 0 every cell finished or diverged (a result), 1 a cell crashed, 2 bad input (nothing written)."""


def _first_comment(path: Path) -> str:
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("#") and "@package" not in line:
            return line.lstrip("# ").strip()
    return ""


def grid_text(name: str) -> str:
    """A grid's axes, seeds, baseline and budget as written in its file."""
    path = CONFIG_DIR / "grid" / f"{name}.yaml"
    if not path.exists():
        return f"unknown grid '{name}'; valid: {', '.join(group_options('grid'))}"
    doc = yaml.safe_load(path.read_text()) or {}
    grid = doc.get("grid") or {}
    lines = [f"grid={name}: {_first_comment(path)}"]
    for axis, values in (grid.get("axes") or {}).items():
        lines.append(f"  axis {axis}: {', '.join(map(str, values))}")
    lines.append(f"  seeds: {grid.get('seeds', [0])}")
    if grid.get("baseline"):
        lines.append(f"  baseline: {grid['baseline']}")
    if doc.get("budget"):
        lines.append(f"  budget: {', '.join(f'{k}={v}' for k, v in doc['budget'].items() if v is not None)}")
    return "\n".join(lines)


def options_text(title: str, options: dict[str, Option], prefix: str = "") -> list[str]:
    """One line per option: key, default, valid values, what it does (nested mappings indented)."""
    lines = [title] if title else []
    for key, opt in options.items():
        default = "{...}" if opt.fields is not None else fmt(opt.default)
        lines.append(f"  {prefix + key:34s} {default:>14s}  {opt.valid_text()}{'  -- ' + opt.help if opt.help else ''}")
        if opt.fields is not None:
            lines += options_text("", dict(opt.fields), prefix + key + ".")
    return lines


def component_options(group: str, choice: str) -> dict[str, Option] | None:
    """The declared options of a config group's choice (None if unknown); `train` etc. are the loop's sections."""
    if group in COMPONENTS:
        path = CONFIG_DIR / group / f"{choice}.yaml"
        name = (yaml.safe_load(path.read_text()) or {}).get("name", choice) if path.exists() else choice
        return COMPONENTS[group].get(name).options() if name in COMPONENTS[group] else None
    return {"launcher": LAUNCHER_OPTIONS, "logger": LOGGER_OPTIONS}.get(group, {}).get(choice)


def help_text(overrides: list[str]) -> str:
    """The usage, every grid with its one-line description, the groups' choices; a named grid's axes."""
    parts = [USAGE, "", "grids:"]
    for name in group_options("grid"):
        parts.append(f"  {name:32s} {_first_comment(CONFIG_DIR / 'grid' / f'{name}.yaml')[:90]}")
    parts += ["", "config groups (group=choice):"]
    for group in GROUPS:
        if group != "grid" and group_options(group):
            parts.append(f"  {group:10s} {', '.join(group_options(group))}")
    for item in overrides:
        if item in CELL_OPTIONS:
            parts += ["", *options_text(f"{item}.* options:", CELL_OPTIONS[item], f"{item}.")]
            continue
        if "=" not in item:
            continue
        key, value = split_override(item)
        if key == "grid":
            parts += ["", grid_text(value)]
        elif (opts := component_options(key, value)) is not None:
            parts += ["", *options_text(f"{key}={value} options (override as {key}.KEY=VALUE):", opts, f"{key}.")]
    return "\n".join(parts)
