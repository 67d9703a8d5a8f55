"""The equal-tuning protocol (`grid.tune`): every method gets the same sweep of its hyperparameters on tuning
seeds, its best setting is chosen there, and the comparison is run at that setting on fresh seeds, so selection
never inflates a reported figure.

    grid:
      tune:
        params: {train.lr: [1.5e-4, 3e-4, 6e-4], objective.clip_range: [1e-4, 1e-2]}
        seeds: [100, 101]      # disjoint from grid.seeds
        select: auc            # auc: the metric's mean over the fixed budget | final: its value at the budget
        metric: eval_heldout_accuracy   # what selects (default: grid.report.metric)

A key a method does not have (clip_range for epg) is not swept for it; the report says how many settings and runs
each method got. Tuning runs stop at the fixed budget (budget.until does not apply to them). A diverged tuning run
scores 0 from its divergence on, a failed one makes its setting unselectable.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from bench.core.errors import UserError
from bench.reporting.stats import learning_curve_auc
from bench.runner import store
from bench.runner.config import split_override
from bench.runner.grid import Cell, check_seeds, make_cell

SELECT = ("auc", "final")


@dataclass
class TuneSpec:
    params: dict[str, list[Any]]
    seeds: list[int]
    select: str
    metric: str
    budget: float | None


def tune_spec(base: DictConfig, report_seeds: list[int]) -> TuneSpec | None:
    """The grid's tuning sweep, checked (UserError on a bad one), or None when the grid tunes nothing."""
    spec = base.grid.get("tune")
    if spec is None:
        return None
    unknown = sorted(set(spec) - {"params", "seeds", "select", "metric"})
    if unknown:
        raise UserError(f"grid.tune.{unknown[0]}: unknown key; valid: params, seeds, select, metric")
    params = {str(k): list(v) if OmegaConf.is_list(v) or isinstance(v, (list, tuple)) else [v]
              for k, v in (spec.get("params") or {}).items()}
    if not params or any(not v for v in params.values()):
        raise UserError(f"grid.tune.params={dict(params)}: empty; valid: a mapping key -> non-empty list of values")
    for key in params:
        if key.split(".")[0] not in base or key.startswith(("seed", "grid", "budget")):
            raise UserError(f"grid.tune.params: '{key}' is not a tunable config key; valid: dotted keys of the "
                            "train, sampler, estimator, objective, advantage sections (e.g. train.lr)")
    seeds = check_seeds(list(spec.get("seeds") or []))
    clash = sorted(set(seeds) & set(report_seeds))
    if clash:
        raise UserError(f"grid.tune.seeds shares seed {clash[0]} with grid.seeds; valid: tuning seeds disjoint from "
                        "the reported ones (a setting chosen on a seed would inflate that seed's figures)")
    select = str(spec.get("select", "auc"))
    if select not in SELECT:
        raise UserError(f"grid.tune.select={select}: unknown; valid: {', '.join(SELECT)}")
    report = base.grid.get("report") or {}
    metric = str(spec.get("metric") or report.get("metric", "eval_reward"))
    return TuneSpec(params, seeds, select, metric, base.budget.get("nfe"))


def _fmt(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def method_templates(cells: list[Cell]) -> list[Cell]:
    """One cell per method (its first seed): the template its tuning and report cells are made from."""
    seen: dict[str, Cell] = {}
    for c in cells:
        seen.setdefault(c.method, c)
    return list(seen.values())


def settings_for(template: Cell, spec: TuneSpec) -> list[dict[str, Any]]:
    """Every combination of the swept keys the method has (keys of other group members are not swept)."""
    keys = [k for k in spec.params if k not in template.inapplicable and _applies(template, k)]
    return [dict(zip(keys, combo)) for combo in itertools.product(*(spec.params[k] for k in keys))]


def _applies(template: Cell, key: str) -> bool:
    """Does the method's resolved config hold `key` (objective.clip_range exists for grpo_clip only)?"""
    node: Any = template.values if template.values is not None else template.cfg  # values: no config to build
    for part in key.split("."):
        if node is None or not hasattr(node, "keys") or part not in node:
            return False
        node = node[part]
    return True


def _with(template: Cell, setting: dict[str, Any]) -> list[str]:
    keys = set(setting)
    return [*(o for o in template.template if split_override(o)[0].lstrip("+") not in keys),
            *(f"{k}={_fmt(v)}" for k, v in setting.items())]


def setting_label(setting: dict[str, Any]) -> str:
    return "-".join(f"{k.split('.')[-1]}={_fmt(v)}" for k, v in setting.items()) or "default"


def tuning_cells(templates: list[Cell], spec: TuneSpec) -> list[Cell]:
    """The sweep: per method, every applicable setting x every tuning seed, stopped at the fixed budget."""
    out = []
    for t in templates:
        for setting in settings_for(t, spec):
            method = f"tune-{t.method}-{setting_label(setting)}"
            for seed in spec.seeds:
                cell = make_cell(method, seed, t.axes, [*_with(t, setting), "budget.until=null"], stage="tune",
                                 setting={"of": t.method, **setting})
                cell.skip_reason = t.skip_reason
                out.append(cell)
    return out


SCORE_FILE = ".tuning_score"  # a finished tuning run's score, with the metrics stamp and spec it was computed for


def run_score(cell_dir: Path, metric: str, budget: float | None, select: str) -> float:
    """A tuning run's selection score: the metric's AUC over [0, budget] NFE (a diverged run counts 0 from its
    last eval on) or its value at the budget; nan when the run failed or has no eval of the metric."""
    status = store.read_status(cell_dir)["status"]
    if status not in ("done", "diverged"):
        return float("nan")
    # Reading ~110 metrics files was a tenth of a rerun of the finished headline grid: a score is kept next to
    # the metrics it came from and used while they are unchanged (same size and mtime) and asked the same way.
    key = [store.file_stamp(Path(cell_dir) / store.METRICS_FILE), status, metric, budget, select]
    score = store.kept_answer(Path(cell_dir) / SCORE_FILE, key)
    if score is store.NOT_KEPT:
        score = _score(store.read_metrics(cell_dir), status, metric, budget, select)
        if key[0] is not None:
            store.keep_answer(Path(cell_dir) / SCORE_FILE, key, score)
    return float(score)


def _score(metrics: list[dict[str, Any]], status: str, metric: str, budget: float | None, select: str) -> float:
    rows = [r for r in metrics if metric in r]
    if not rows:
        return float("nan")
    x = np.array([float(r["nfe"]) for r in rows])
    y = np.array([float(r[metric]) for r in rows])
    if status == "diverged":
        x, y = np.append(x, x[-1]), np.append(y, 0.0)
    if select == "final":
        return float(y[-1])
    return learning_curve_auc(x, y, float(budget) if budget else float(x.max()))


@dataclass
class Choice:
    """A method's tuning outcome: the chosen setting and every setting's mean score over the tuning seeds."""

    method: str
    setting: dict[str, Any]
    scores: list[tuple[dict[str, Any], float, int]]  # (setting, mean score, runs scored)


def choose(grid_dir: Path, tune: list[Cell], spec: TuneSpec) -> dict[str, Choice]:
    """Per method, the setting with the best mean score over its tuning seeds (ties: the first in sweep order); a
    setting with a failed or missing run is chosen only when every setting has one."""
    by_method: dict[str, dict[str, list[Cell]]] = {}
    for c in tune:
        if c.skip_reason is None:
            by_method.setdefault(c.setting["of"], {}).setdefault(c.method, []).append(c)
    out = {}
    for method, settings in by_method.items():
        scores = []
        for runs in settings.values():
            vals = [run_score(Path(grid_dir) / c.name, spec.metric, spec.budget, spec.select) for c in runs]
            ok = [v for v in vals if math.isfinite(v)]
            mean = float(np.mean(ok)) if len(ok) == len(vals) else -math.inf if ok else float("nan")
            scores.append(({k: v for k, v in runs[0].setting.items() if k != "of"}, mean, len(ok)))
        ranked = [s for s in scores if math.isfinite(s[1])] or [s for s in scores if s[1] == -math.inf]
        if ranked:
            best = max(ranked, key=lambda s: s[1])  # max keeps the first of equals
            out[method] = Choice(method, best[0], scores)
    return out


def report_cells(templates: list[Cell], seeds: list[int], chosen: dict[str, Choice]) -> list[Cell]:
    """The comparison: every method at its chosen setting on the grid's (fresh) seeds; a method whose tuning
    produced no usable run is skipped with that reason."""
    out = []
    for t in templates:
        c = chosen.get(t.method)
        for seed in seeds:
            if t.skip_reason is not None or c is None:
                cell = Cell(f"{t.method}-seed{seed}", t.method, seed, t.axes, [*t.template, f"seed={seed}"], t.cfg,
                            skip_reason=t.skip_reason or "its tuning runs all failed: no setting to report",
                            labels=t.labels)
            else:
                cell = make_cell(t.method, seed, t.axes, _with(t, c.setting), setting=c.setting)
            out.append(cell)
    return out
