"""Grid expansion: axes x seeds -> cells, each a resolved config, with invalid combinations skipped."""
from __future__ import annotations

import functools
import itertools
import json
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from bench.runner import compose_cache, resolve_cache
from bench.runner.config import GROUPS, check_group_choice, split_override
from bench.core.errors import UserError
from bench.runner.config_clone import ConfigFactory
from bench.runner.resolve import identity, identity_hash, resolved_values
from bench.runner.components import incompatibility, validate_cell

BASE_CELL = "base"
METHOD_SECTIONS = ("sampler", "estimator", "objective", "advantage")  # what bench.runner.components.incompatibility reads


@dataclass
class Cell:
    """One training run: a point on the grid's axes and a seed."""

    name: str                      # folder name, e.g. elbo-ode-epg-seed0
    method: str                    # the cell name without its seed: the unit of comparison
    seed: int
    axes: dict[str, Any]           # axis -> value
    overrides: list[str]
    config: DictConfig | None = None  # read it as `cfg`: built from `values` when first asked for
    skip_reason: str | None = None
    labels: dict[str, str] = field(default_factory=dict)  # sampler/estimator/objective names
    hash: str = ""                 # of its resolved config minus non-semantic keys (bench.runner.resolve.cell_hash)
    inapplicable: dict[str, list[str]] = field(default_factory=dict)  # keys of other group members, left out
    stage: str = "report"          # "tune": a run of the tuning sweep (grid.tune), not part of the comparison
    setting: dict[str, Any] = field(default_factory=dict)  # the tuned keys' values this cell runs with
    # bench.runner.resolve.identity(cfg), kept from when the cell was made (planning compares it with the folder's)
    identity: dict[str, Any] | None = field(default=None, repr=False, compare=False)
    # Its plain resolved values, until `cfg` makes the DictConfig of them: a rerun of a finished grid never looks
    # at most cells' configs, and building ~250 of them was a fifth of what it cost.
    values: dict[str, Any] | None = field(default=None, repr=False, compare=False)

    @property
    def cfg(self) -> DictConfig | None:
        """The cell's resolved config."""
        if self.config is None and self.values is not None:
            self.config, self.values = _configs.make(self.values), None
        return self.config

    @cfg.setter
    def cfg(self, cfg: DictConfig | None) -> None:
        self.config, self.values = cfg, None

    @property
    def has_config(self) -> bool:
        return self.config is not None or self.values is not None

    @property
    def template(self) -> list[str]:
        """Its overrides without the seed: what every seed of its method shares."""
        return [o for o in self.overrides if not o.startswith("seed=")]


def _label(axis: str, value: Any) -> str:
    text = str(value) if axis in GROUPS else f"{axis.split('.')[-1]}={value}"
    return re.sub(r"[^A-Za-z0-9_.=]+", "_", text)


def split_sweeps(user_overrides: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Hydra's sweep syntax on the command line: `key=a,b` becomes an axis with values [a, b] (a list or mapping
    value in brackets or braces is one value, not a sweep)."""
    rest, sweeps = [], {}
    for item in user_overrides:
        key, value = split_override(item)
        if key.startswith("hydra.") or key == "hydra":
            raise UserError(f"{key}={value}: hydra.* settings do not apply (cells are composed with Hydra's compose "
                            "API, not @hydra.main); valid: results_dir=, launcher=, logger= and the config keys")
        if "," in value and not value.strip().startswith(("[", "{", "'", '"')) and not item.startswith(("+", "~")):
            values = [v.strip() for v in value.split(",")]
            if any(not v for v in values):
                raise UserError(f"{key}={value}: empty value in sweep; valid: {key}=a,b,...")
            sweeps[key] = values
        else:
            rest.append(item)
    return rest, sweeps


def check_seeds(seeds: list) -> list[int]:
    """The grid's seeds as integers: at least one, no repeats."""
    try:
        out = [int(s) for s in seeds]
    except (TypeError, ValueError):
        raise UserError(f"grid.seeds={list(seeds)}: not integers; valid: a non-empty list of distinct integers") from None
    if not out:
        raise UserError("grid.seeds=[]: empty; valid: a non-empty list of distinct integers")
    if len(set(out)) != len(out):
        raise UserError(f"grid.seeds={out}: repeated seed; valid: a non-empty list of distinct integers")
    return out


def expand_grid(grid_name: str, user_overrides: list[str]) -> tuple[DictConfig, list[Cell]]:
    """Compose `grid=<name>` with the user's overrides and expand its axes x seeds (a command-line sweep
    `key=a,b` adds or replaces an axis)."""
    check_group_choice("grid", grid_name)
    _composed.cache_clear()
    _configs.clear()
    compose_cache.forget()
    resolve_cache.forget()
    user_overrides, sweeps = split_sweeps(user_overrides)
    for key, values in sweeps.items():
        for v in values:
            check_group_choice(key, v)
    base = compose_cache.compose_cached([f"grid={grid_name}", *user_overrides, *(f"{k}={v[0]}" for k, v in sweeps.items())])
    if "grid" not in base or base.grid is None:
        raise UserError(f"grid '{grid_name}' defines no 'grid:' section")
    axes: dict[str, list] = {str(k): list(v) for k, v in (base.grid.get("axes") or {}).items()}
    axes.update(sweeps)
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
    rest, restricted = [], {}
    for item in user_overrides:
        key, value = split_override(item)
        if key in axes:
            axes[key] = [value]
            restricted[key] = value
        else:
            rest.append(item)
    # A method preset chosen on the command line fixes its own components: a grid axis over them would put the
    # preset's knobs on other components. Naming the axis as well (method=tree_grpo estimator=elbo) still crosses.
    chosen = {split_override(o)[0] for o in user_overrides}
    if "method" in chosen and "method" not in axes:
        for group in ("sampler", "estimator", "objective", "advantage"):
            if group not in chosen:
                axes.pop(group, None)
    seeds = check_seeds(list(base.grid.get("seeds") if base.grid.get("seeds") is not None else [base.seed]))
    seed_override = [v for k, v in map(split_override, user_overrides) if k == "seed"]
    if seed_override:
        try:
            seeds = [int(seed_override[-1])]
        except ValueError:
            raise UserError(f"seed={seed_override[-1]}: not an integer; valid: an integer") from None
    if "seed" in axes:
        raise UserError("seed: is not an axis; valid: grid.seeds=[...] for several seeds")
    points = [dict(zip(axes.keys(), combo)) for combo in itertools.product(*axes.values())]
    points += [p for p in extra_points(base, axes)
               if all(str(p.get(k)) == v for k, v in restricted.items() if p.get(k) is not None)]
    cells = []
    for point in points:
        point = {a: v for a, v in point.items() if v is not None}
        method = "-".join(_label(a, v) for a, v in point.items()) or "default"
        for seed in seeds:
            cells.append(make_cell(method, seed, point, [f"grid={grid_name}", *rest, *(f"{a}={v}" for a, v in point.items())]))
    # Where and how cells run is the same for every cell: the base config carries the checked sections.
    OmegaConf.set_struct(base, False)
    for section in ("launcher", "logger", "train", "budget", "lock"):
        base[section] = cells[0].cfg[section] if cells else base.get(section)
    return base, cells


_configs = ConfigFactory()  # the cells' resolved configs: a grid's cells share a few shapes


@functools.lru_cache(maxsize=256)
def _composed(template: tuple[str, ...]) -> bytes:
    """The composed config of `template` (without a seed), pickled: each cell unpickles its own copy (several
    times faster than a deepcopy of a DictConfig). One Hydra composition per method, shared by its seeds (a seed
    is a plain value, so `seed=N` as an override and as a key set afterwards give the same config), and kept
    across runs (bench/runner/compose_cache.py). Cleared by every expand_grid, so edited YAML files are read again."""
    return compose_cache.composed_bytes(template)


def _resolved(template: list[str], seed: int) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """The plain resolved values of the cell of `template` and `seed`, and the keys left out as other members'."""
    dropped: dict[str, list[str]] = {}
    composed = pickle.loads(_composed(tuple(template)))
    composed.seed = int(seed)
    return resolved_values(composed, dropped, owned=True), dropped


def make_cell(method: str, seed: int, point: dict[str, Any], template: list[str], stage: str = "report",
              setting: dict[str, Any] | None = None, name: str | None = None) -> Cell:
    """One cell: `template` overrides (grid, axes, settings) plus the seed, composed and resolved."""
    overrides = [*template, f"seed={seed}"]
    values, dropped = resolve_cache.resolved_cell(tuple(template), int(seed), lambda: _resolved(template, seed))
    ident = identity(values)  # of the plain values: converting the DictConfig back costs as much as resolving
    return Cell(name or f"{method}-seed{seed}", method, seed, point, overrides, hash=identity_hash(ident),
                identity=ident, values=values,
                inapplicable=dropped, stage=stage, setting=dict(setting or {}),
                labels={**{g: str(values[g]["name"]) for g in ("sampler", "estimator", "objective") if g in values},
                        # the method/ recipe, even when chosen outside the axes
                        **({"preset": str(values["preset"])} if values.get("preset") else {})})


def extra_points(base: DictConfig, axes: dict[str, list]) -> list[dict[str, Any]]:
    """grid.extra: methods beside the axes' product (e.g. a control with other settings), each a mapping of axis
    values and further keys; an axis it does not name is left out of its label."""
    out = []
    for i, spec in enumerate(base.grid.get("extra") or []):
        if not hasattr(spec, "items") or not spec:
            raise UserError(f"grid.extra[{i}]={spec}: not a mapping; valid: a list of {{key: value}} mappings")
        point = {a: None for a in axes}
        point.update({str(k): v for k, v in spec.items()})
        for key, value in point.items():
            if key in GROUPS and value is not None:
                check_group_choice(key, str(value))
        out.append(point)
    return out


def unused_keys(cells: list[Cell]) -> dict[str, list[str]]:
    """Keys set for a group (e.g. estimator.J) that no cell of this run uses: key -> the members that declare it."""
    if not cells:
        return {}
    common = set(cells[0].inapplicable)
    for cell in cells[1:]:
        common &= set(cell.inapplicable)
    return {k: cells[0].inapplicable[k] for k in sorted(common)}


def _sections(cell: Cell, sections: tuple[str, ...]) -> dict[str, Any]:
    """The cell's resolved config sections and world as plain values, without building its config."""
    if cell.values is not None:
        return {g: cell.values.get(g) for g in (*sections, "world")}
    cfg = cell.cfg
    return {g: OmegaConf.to_container(cfg[g], resolve=True) if isinstance(cfg.get(g), DictConfig) else cfg.get(g)
            for g in (*sections, "world")}


def _checked_once(cells: list[Cell], sections: tuple[str, ...], world_keys: tuple[str, ...] | None,
                  check: Callable[[DictConfig], Any]) -> list[Any]:
    """check() on a config of just `sections` and the world (only its `world_keys` when given), once per distinct
    set of their values; the answer of each cell in order."""
    # The checks read those sections only: a method's seeds and tuned settings share one answer, and a rerun of
    # a finished grid builds no cell config for them.
    answers: dict[str, Any] = {}
    out = []
    for cell in cells:
        part = _sections(cell, sections)
        world = part["world"] or {}
        if world_keys is not None:
            part["world"] = {k: world.get(k) for k in world_keys}
        else:  # each seed draws its own eval noise (world.eval.noise_seed), which no check reads
            eval_cfg = {k: v for k, v in (world.get("eval") or {}).items() if k != "noise_seed"}
            part["world"] = {**world, "eval": eval_cfg}
        key = json.dumps(part, sort_keys=True, default=repr)
        if key not in answers:
            answers[key] = check(OmegaConf.create(part))
        out.append(answers[key])
    return out


def validate_cells(cells: list[Cell], check_files: bool = True) -> None:
    """validate_cell (UserError on the first bad one, in grid order) on every cell."""
    _checked_once(cells, ("train", *METHOD_SECTIONS), None, lambda cfg: validate_cell(cfg, check_files=check_files))


def mark_invalid(cells: list[Cell]) -> None:
    """Fill skip_reason for combinations that cannot work (e.g. stepwise on an ODE sampler)."""
    for cell, reason in zip(cells, _checked_once(cells, METHOD_SECTIONS, ("name",), incompatibility)):
        cell.skip_reason = reason


def resolved_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
