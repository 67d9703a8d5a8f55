"""A cell's config resolved against every declared schema, and its identity: the hash of what it trains.

Hydra composes the YAML files; this module then checks every section against the options its code declares
(bench/core/schema.py): each component's `OPTIONS` (world, sampler, estimator, objective, advantage) and the loop's
`CELL_OPTIONS` (bench/training/train_options.py, beside the loop). Defaults are filled in, so a cell's config.yaml says everything it ran with, and
its hash changes whenever anything that shapes its numbers does.
"""
from __future__ import annotations

import functools
import hashlib
import json
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from bench.core.errors import UserError
from bench.runner.launcher_options import LAUNCHER_OPTIONS
from bench.runner.loggers import LOGGER_OPTIONS
from bench.core.registry import Registry
from bench.core.schema import Option, fmt, resolve, unknown_key_error
from bench.training.train_options import CELL_OPTIONS
from bench.worlds import WORLDS
from estimators import ESTIMATORS
from objectives import ADVANTAGES, OBJECTIVES
from samplers import SAMPLERS

COMPONENTS: dict[str, Registry] = {"world": WORLDS, "sampler": SAMPLERS, "estimator": ESTIMATORS,
                                   "objective": OBJECTIVES, "advantage": ADVANTAGES}
TOP_OPTIONS = {
    "seed": Option(0, int, help="seeds prompts order, initial noise and SDE noise"),
    "results_dir": Option("results", str),
    "preset": Option(None, str, nullable=True, help="the method/ recipe this cell follows"),
}
# Keys that change where or how a cell runs, not what it computes: left out of its identity.
NON_SEMANTIC = ("launcher", "logger", "results_dir", "lock", "checkpoint", "grid", "hydra",
                "world.threads", "world.decode_batch", "world.embed_cache_device")


def _plain(cfg: Any) -> dict[str, Any]:
    if isinstance(cfg, DictConfig):
        try:
            return OmegaConf.to_container(cfg, resolve=True)
        except OmegaConfBaseException as e:
            raise UserError(f"bad config: {str(e).splitlines()[0]}") from None
    return dict(cfg)


def _with_world_defaults(cfg: DictConfig | dict, in_place: bool = False) -> DictConfig | dict:
    """The config with the world's defaults filled in before interpolations resolve: other sections read world
    values (`sampler.shift: ${world.shift}`) that the world's YAML may leave to its code defaults. `in_place`: the
    caller owns `cfg` (a fresh copy), so its world section is replaced there instead of rebuilding the whole config
    (the same values either way; rebuilding is most of the cost of resolving a cell)."""
    if not isinstance(cfg, DictConfig) or not isinstance(cfg.get("world"), DictConfig) or "name" not in cfg.world:
        return cfg
    try:
        world = OmegaConf.to_container(cfg.world, resolve=True)
    except OmegaConfBaseException as e:
        raise UserError(f"bad config: {str(e).splitlines()[0]}") from None
    cls = COMPONENTS["world"].get(str(world["name"]))
    filled = cls.resolve_options(world, prefix="world")
    if in_place:
        with open_dict(cfg):
            cfg.world = filled
        return cfg
    raw = OmegaConf.to_container(cfg, resolve=False)
    raw["world"] = filled
    return OmegaConf.create(raw)


def group_keys(group: str) -> dict[str, list[str]]:
    """Every option key of a config group -> the members that declare it (e.g. estimator.J -> [elbo])."""
    registry = COMPONENTS[group]
    registry._load()  # the package's own members; entry-point plugins join _items when the first call loads them
    return {k: list(v) for k, v in _group_keys(group, frozenset(registry._items)).items()}


@functools.lru_cache(maxsize=64)
def _group_keys(group: str, members: frozenset[str]) -> dict[str, list[str]]:
    # Keyed by the members the registry holds: a `module:Class` plugin loaded later is a new key. Listing entry
    # points scans every installed distribution (ms each), too slow for every section of every cell.
    out: dict[str, list[str]] = {}
    for name in COMPONENTS[group].names():
        for key in COMPONENTS[group].get(name).options():
            out.setdefault(key, []).append(name)
    return out


def _component(group: str, section: Any, inapplicable: dict[str, list[str]]) -> dict[str, Any]:
    """The section resolved against its member's options. A key that another member of the group declares (a
    grid setting `estimator.weighting: adaptive` meets its stepwise cells) does not apply to this cell: it is left
    out of the cell's config and identity and recorded in `inapplicable`; a key no member declares is refused."""
    if not isinstance(section, dict) or "name" not in section:
        raise UserError(f"{group}: needs a name; valid: {', '.join(COMPONENTS[group].names())}")
    cls = COMPONENTS[group].get(str(section["name"]))
    own = cls.options()
    foreign = [k for k in section if k != "name" and k not in own]
    others = group_keys(group) if foreign else {}
    for key in [k for k in foreign if k in others]:
        inapplicable.setdefault(f"{group}.{key}", others[key])
        section = {k: v for k, v in section.items() if k != key}
    return cls.resolve_options(section, prefix=group)


def resolve_cell(cfg: DictConfig | dict, inapplicable: dict[str, list[str]] | None = None) -> DictConfig:
    """The cell's config with every section checked against its schema and defaults filled (UserError if not);
    keys that belong to other members of a group are dropped and listed in `inapplicable` (key -> members)."""
    return OmegaConf.create(resolved_values(cfg, inapplicable))


def resolved_values(cfg: DictConfig | dict, inapplicable: dict[str, list[str]] | None = None,
                    owned: bool = False) -> dict[str, Any]:
    """resolve_cell's config as plain values. `owned`: `cfg` is the caller's own copy, which may be changed on
    the way (faster)."""
    inapplicable = {} if inapplicable is None else inapplicable
    d = _plain(_with_world_defaults(cfg, in_place=owned))
    known = {*COMPONENTS, *CELL_OPTIONS, *TOP_OPTIONS, "launcher", "logger", "grid", "hydra"}
    for key in d:
        if key not in known:
            raise unknown_key_error("", str(key), sorted(known))
    out: dict[str, Any] = resolve(TOP_OPTIONS, {k: d[k] for k in TOP_OPTIONS if k in d}, "")
    if not out["results_dir"].strip():
        raise UserError("results_dir='': empty; valid: a folder path (default: results)")
    for group in COMPONENTS:
        out[group] = _component(group, d.get(group), inapplicable)
    for section, options in CELL_OPTIONS.items():
        out[section] = resolve(options, d.get(section), section, extra=())
    if not any(out["budget"][k] is not None for k in ("nfe", "device_hours", "iterations")):
        raise UserError("budget: none set; valid: one of budget.nfe, budget.device_hours, budget.iterations")
    check_until(out["budget"], out["world"]["name"])
    out["launcher"] = _named("launcher", d.get("launcher"), LAUNCHER_OPTIONS)
    out["logger"] = _named("logger", d.get("logger"), LOGGER_OPTIONS)
    if d.get("grid") is not None:
        out["grid"] = d["grid"]
    return out


def check_until(budget: dict[str, Any], world_name: str) -> None:
    """budget.until extends a run past budget.nfe: it needs that budget, a cap above it and a metric of the world."""
    until = budget.get("until")
    if until is None:
        return
    if budget.get("nfe") is None:
        raise UserError("budget.until needs budget.nfe (the fixed budget the final figures are read at); "
                        f"valid: budget.nfe=N with budget.until.cap_nfe > N")
    if int(until["cap_nfe"]) <= int(budget["nfe"]):
        raise UserError(f"budget.until.cap_nfe={until['cap_nfe']}: not above budget.nfe={budget['nfe']}; "
                        "valid: a cap above the budget")
    metrics = getattr(WORLDS.get(world_name), "EVAL_METRICS", {})
    if metrics and until["metric"] not in metrics:
        raise UserError(f"budget.until.metric={until['metric']}: not an eval metric of world '{world_name}'; "
                        f"valid: {', '.join(metrics)}")


def _named(group: str, section: Any, options: dict[str, dict[str, Option]]) -> dict[str, Any]:
    section = dict(section or {})
    name = str(section.get("name", "none" if group == "logger" else "local"))
    if name not in options:
        raise UserError(f"{group}={fmt(name)}: unknown; valid: {', '.join(sorted(options))}")
    return resolve(options[name], section, group)


def identity(cfg: DictConfig | dict) -> dict[str, Any]:
    """What a cell computes: its resolved config without the keys in NON_SEMANTIC (of plain values `cfg`, a new
    dict: the caller's sections are copied before keys are dropped)."""
    d = _plain(cfg) if isinstance(cfg, DictConfig) else {k: dict(v) if isinstance(v, dict) else v for k, v in cfg.items()}
    for key in NON_SEMANTIC:
        head, _, tail = key.partition(".")
        if tail:
            if isinstance(d.get(head), dict):
                d[head].pop(tail, None)
        else:
            d.pop(head, None)
    return d


def cell_hash(cfg: DictConfig | dict) -> str:
    """12 hex digits of the SHA-256 of the cell's identity (keys sorted, so it does not depend on YAML order)."""
    return identity_hash(identity(cfg))


def identity_hash(ident: dict[str, Any]) -> str:
    """cell_hash of a cell whose identity is already known."""
    text = json.dumps(ident, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def config_diff(old: dict[str, Any], new: dict[str, Any], limit: int = 4) -> str:
    """The keys whose values differ between two identities, as `key: old -> new` (the first `limit` of them)."""
    a, b = _flatten(old), _flatten(new)
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k, "<unset>") != b.get(k, "<unset>"))
    parts = [f"{k}: {fmt(a.get(k, '<unset>'))} -> {fmt(b.get(k, '<unset>'))}" for k in keys[:limit]]
    if len(keys) > limit:
        parts.append(f"and {len(keys) - limit} more")
    return ", ".join(parts)
