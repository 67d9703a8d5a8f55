"""Grid expansion: axes x seeds -> cells, each a resolved config, with invalid combinations skipped."""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from bench.config import GROUPS, check_group_choice, compose_config, split_override
from bench.errors import UserError

BASE_CELL = "base"


@dataclass
class Cell:
    """One training run: a point on the grid's axes and a seed."""

    name: str                      # folder name, e.g. elbo-ode-epg-seed0
    method: str                    # the cell name without its seed: the unit of comparison
    seed: int
    axes: dict[str, Any]           # axis -> value
    overrides: list[str]
    cfg: DictConfig | None = None
    skip_reason: str | None = None
    labels: dict[str, str] = field(default_factory=dict)  # sampler/estimator/objective names


def _label(axis: str, value: Any) -> str:
    text = str(value) if axis in GROUPS else f"{axis.split('.')[-1]}={value}"
    return re.sub(r"[^A-Za-z0-9_.=]+", "_", text)


def expand_grid(grid_name: str, user_overrides: list[str]) -> tuple[DictConfig, list[Cell]]:
    """Compose `grid=<name>` with the user's overrides and expand its axes x seeds."""
    check_group_choice("grid", grid_name)
    base = compose_config([f"grid={grid_name}", *user_overrides])
    if "grid" not in base or base.grid is None:
        raise UserError(f"grid '{grid_name}' defines no 'grid:' section")
    axes: dict[str, list] = {str(k): list(v) for k, v in (base.grid.get("axes") or {}).items()}
    known_top = set(base.keys()) | set(GROUPS)
    for axis, values in axes.items():
        if axis.split(".")[0] not in known_top:
            raise UserError(f"grid '{grid_name}' has unknown axis '{axis}'; valid: {', '.join(sorted(known_top - {'grid'}))} "
                            "or a dotted key inside them")
        if not values:
            raise UserError(f"grid '{grid_name}' axis '{axis}' has no values")
        for v in values:
            if axis in GROUPS:
                check_group_choice(axis, str(v))
    # An override of an axis on the command line restricts that axis to the given value.
    rest = []
    for item in user_overrides:
        key, value = split_override(item)
        if key in axes:
            axes[key] = [value]
        else:
            rest.append(item)
    seeds = [int(s) for s in (base.grid.get("seeds") or [base.seed])]
    if "seed" in {split_override(o)[0] for o in user_overrides}:
        seeds = [int(base.seed)]
    cells = []
    for combo in itertools.product(*axes.values()):
        point = dict(zip(axes.keys(), combo))
        method = "-".join(_label(a, v) for a, v in point.items()) or "default"
        for seed in seeds:
            overrides = [f"grid={grid_name}", *rest, *(f"{a}={v}" for a, v in point.items()), f"seed={seed}"]
            cfg = compose_config(overrides)
            cells.append(Cell(f"{method}-seed{seed}", method, seed, point, overrides, cfg,
                              labels={**{g: str(cfg[g].name) for g in ("sampler", "estimator", "objective") if g in cfg},
                                      # the method/ recipe, even when chosen outside the axes
                                      **({"preset": str(cfg.preset)} if cfg.get("preset") else {})}))
    return base, cells


def mark_invalid(cells: list[Cell]) -> None:
    """Fill skip_reason for combinations that cannot work (e.g. stepwise on an ODE sampler)."""
    from bench.components import incompatibility

    for cell in cells:
        cell.skip_reason = incompatibility(cell.cfg)


def resolved_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
