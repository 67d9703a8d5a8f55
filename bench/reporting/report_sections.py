"""The sections of a grid's report.md below its summary: the methods table, the per-seed collapse check, the
Pareto front over learning curves, the cells' states, sample grids and configs as differences from the baseline."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from bench.core.lazy import lazy_module
from bench.runner import store
from bench.reporting.collapse import seed_signs
from bench.worlds.detectors import Detector
from bench.runner.grid import BASE_CELL
from bench.reporting.plots import mean_curves
from bench.reporting.sample_grids import sample_grid
from bench.reporting.stats import curve_envelope, mean_ci
from bench.reporting.summary import flat_config
from bench.reporting.thresholds import censored_mean_text, fmt_nfe, speedup

pd = lazy_module("pandas")


def ci_text(values, digits: int = 3) -> str:
    m, lo, hi = mean_ci(values)
    return f"{m:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]" if math.isfinite(m) else "—"


def short(metric: str) -> str:
    return metric.removeprefix("eval_").replace("_", " ")


def methods_table(runs: pd.DataFrame, metric: str, columns: list[str], t_star: float | None, baseline: str | None,
                  methods: list[str], aliases: dict[str, list[str]], flagged: dict[str, int]) -> list[str]:
    """One row per distinct method (bit-identical ones merged): final figures, AUC, NFE to the headline threshold
    and the speed-up over the baseline there, each with a 95% t interval over seeds."""
    head = ["method", "runs", *(f"final {short(c)}" for c in columns), f"AUC of {short(metric)} over NFE"]
    if t_star is not None:
        head += [f"NFE to {short(metric)} {t_star:g} (reached)", f"speed-up at {t_star:g} vs baseline"]
    head.append("collapse / hacking signs")
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    base = runs[runs.method == baseline] if baseline is not None else runs.iloc[:0]
    for method in methods:
        g = runs[runs.method == method]
        if not len(g):
            continue
        name = f"**{method}** (baseline)" if method == baseline else f"`{method}`"
        if aliases.get(method):
            name += " ≡ " + ", ".join(f"`{a}`" for a in aliases[method])
        states = g.state.value_counts()
        runs_txt = f"{len(g)}" + (f" ({states['diverged']} diverged)" if "diverged" in states else "")
        row = [name, runs_txt, *(ci_text(g[c]) for c in columns), ci_text(g.auc)]
        if t_star is not None:
            row.append(censored_mean_text(g[f"nfe@{t_star:g}"].to_numpy(float), g[f"reached@{t_star:g}"].to_numpy(bool)))
            if method == baseline:
                row.append("(baseline)")
            elif len(base):
                (r, lo, hi), q = speedup(g, base, t_star)
                row.append(f"{q}{r:.2f}x [{lo:.2f}, {hi:.2f}]")
            else:
                row.append("no baseline")
        row.append(f"{flagged.get(method, 0)}/{len(g)} seeds flagged")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def collapse_section(df: pd.DataFrame, runs: pd.DataFrame, metric: str, detectors: list[Detector],
                     world: str) -> tuple[list[str], dict[str, int]]:
    """Per seed: its own-peak check on the report metric and the world's detectors; (lines, flagged per method)."""
    flagged: dict[str, int] = {}
    found = []
    for _, r in runs.sort_values(["method", "seed"]).iterrows():
        curve = df[(df.cell == r.cell) & df.eval_reward.notna()]
        signs = seed_signs(curve, metric, detectors)
        if signs:
            flagged[r.method] = flagged.get(r.method, 0) + 1
            found.append(f"- `{r.cell}`: " + "; ".join(signs))
    lines = ["", "## Collapse and reward-hacking check (per seed)", ""]
    rules = [f"every seed's {short(metric)} against its own peak (flagged when it lost more than half its gain)"]
    for d in detectors:
        if d.kind == "floor":
            rules.append(f"{short(d.metric)} below {d.factor:g} x the real data's {d.reference:.2f}")
        elif d.kind == "ceiling":
            rules.append(f"{short(d.metric)} above {d.factor:g} x the real data's {d.reference:.2f} and "
                         f"{d.rise:g} above the seed's own best")
        else:
            rules.append(f"{short(d.metric)} minus {short(d.partner)} grown by more than {d.rise:g}")
    lines.append("Checked, with no requirement that the reward rose: " + "; ".join(rules) + ".")
    if not detectors:
        lines += ["", f"World `{world}` declares no collapse or reward-hacking detectors, so this report makes no "
                  "claim about reward hacking either way; only the peak check ran. Its reward parts and held-out "
                  "rewards are in the table below (train on one reward, read the others)."]
    lines.append("")
    lines += found or [f"No seed was flagged ({len(runs)} runs checked)."]
    parts = [c for c in runs.columns if c.startswith("eval_reward_")]
    if parts:
        lines += ["", "| method | " + " | ".join(f"final {short(c)}" for c in parts) + " |", "|---" * (len(parts) + 1) + "|"]
        lines += [f"| `{m}` | " + " | ".join(ci_text(g[c]) for c in parts) + " |" for m, g in runs.groupby("method")]
    return lines, flagged


def envelope_section(df: pd.DataFrame, metrics: list[str]) -> list[str]:
    """Which methods form the upper envelope of the learning curves (every eval point of every method's mean curve)
    and over what compute range."""
    lines = ["", "## Pareto front over learning curves", "",
             "The upper envelope of the mean learning curves: of every eval point of every method, those no other "
             "point beats with less or equal compute and a higher or equal figure (the best figure reachable at each "
             "compute, and who reaches it). Device-hours on a shared CPU are noisy (see Cost per iteration): read the "
             "NFE rows.", "", "| compute | figure | methods on the front (compute range where each holds it) |",
             "|---|---|---|"]
    for x in ("nfe", "device_hours"):
        for y in metrics:
            if y not in df or not df[y].notna().any():
                continue
            front = curve_envelope(mean_curves(df, x, y))
            spans: list[list] = []
            for cx, _cy, name in front:
                if spans and spans[-1][0] == name:
                    spans[-1][2] = cx
                else:
                    spans.append([name, cx, cx])
            text = ", ".join(f"`{n}` ({a:.3g}-{b:.3g})" if b > a else f"`{n}` ({a:.3g})" for n, a, b in spans)
            lines.append(f"| {x} | {short(y)} | {text or 'none'} |")
    return lines


def cells_section(df: pd.DataFrame) -> list[str]:
    """Every cell of the grid folder that is not a finished result: diverged, failed, unfinished, pending, skipped."""
    cells = df[df.cell != BASE_CELL].drop_duplicates("cell")
    counts = cells.state.value_counts()
    lines = ["", "## Cells", "",
             "Every cell of the grid folder: " + ", ".join(f"{n} {s}" for s, n in counts.items()) + ".", ""]
    for state in ("diverged", "failed"):
        for _, r in cells[cells.state == state].iterrows():
            error = r.reason if isinstance(r.reason, str) and r.reason else "no error recorded"
            # A divergence recorded with status "failed" (older runners) says both.
            head = f"{state}: failed" if state == "diverged" and r.status == "failed" else state
            lines.append(f"- {head} `{r.cell}`: {error}")
    for state in ("unfinished", "pending"):
        for _, r in cells[cells.state == state].iterrows():
            lines.append(f"- `{r.cell}`: {r.state_text}")
    for _, r in cells[cells.state == "skipped"].drop_duplicates("method").iterrows():
        lines.append(f"- skipped `{r.method}`: {r.reason}")
    return lines


def representative_cells(runs: pd.DataFrame, methods: list[str]) -> dict[str, str]:
    """Per method, the cell of its lowest seed."""
    return {m: runs[runs.method == m].sort_values("seed").cell.iloc[0] for m in methods if (runs.method == m).any()}


def samples_section(df: pd.DataFrame, runs: pd.DataFrame, grid_dir: Path, metric: str, methods: list[str],
                    layout: tuple[list[str], int] | None, max_points: int = 6) -> list[str]:
    """Per method a grid of its lowest seed's eval samples: a row per prompt, a column per eval point."""
    cells = representative_cells(runs, methods)
    if not cells:
        return []
    lines = ["", "## Samples", "",
             f"Each method's lowest seed on the eval's fixed noise: one row per prompt, one column per eval point "
             f"(up to {max_points}, from the start to the end of training; header: iteration, NFE, {short(metric)}). "
             "Collapse shows as one glyph per prompt, hacking as samples that drift from real-looking ones.", ""]
    for method, cell in cells.items():
        evals = df[(df.cell == cell) & df.eval_reward.notna()].sort_values("iteration")
        picks = sorted({int(round(i)) for i in np.linspace(0, len(evals) - 1, min(max_points, len(evals)))})
        sheets = [(grid_dir / cell / "samples" / f"eval_{int(r.iteration):04d}.png",
                   f"it {int(r.iteration)}\nNFE {fmt_nfe(r.nfe)}\n{short(metric)} {r[metric]:.2f}"
                   if metric in r and pd.notna(r[metric]) else f"it {int(r.iteration)}\nNFE {fmt_nfe(r.nfe)}")
                  for _, r in evals.iloc[picks].iterrows()]
        name = f"samples_{cell}.png"
        if layout is not None:
            out = sample_grid(sheets, layout[0], layout[1], grid_dir / name)
            lines += [f"**`{method}`** ({cell})", "", f"![{method} samples]({name})" if out else "(no sample sheets)", ""]
        else:
            shots = [f"![{cell}]({p.relative_to(grid_dir)})<br>{h.replace(chr(10), ', ')}" for p, h in sheets if p.exists()]
            lines += [f"**`{method}`** ({cell})", "", "| " + " | ".join(["eval"] * len(shots)) + " |",
                      "|---" * len(shots) + "|", "| " + " | ".join(shots) + " |", ""] if shots else []
    return lines


def configs_section(runs: pd.DataFrame, grid_dir: Path, baseline: str | None, methods: list[str]) -> list[str]:
    """Resolved configs as differences from the baseline's (full YAMLs in the HTML's collapsibles and the files)."""
    cells = representative_cells(runs, methods)
    flat = {m: flat_config(grid_dir / c / store.CONFIG_FILE) for m, c in cells.items()}
    ref = flat.get(baseline) if baseline is not None else None
    if ref is None and flat:
        baseline, ref = next(iter(flat.items()))
    if not flat:
        return []
    lines = ["", "## Configs", "",
             f"Each method's resolved config (its lowest seed) as its differences from `{baseline}`'s; a swapped config "
             "group (estimator: stepwise -> elbo) is named once. The full files are the cells' config.yaml.", "",
             "| method | differs from the baseline in |", "|---|---|"]
    for method, cfg in flat.items():
        if method == baseline:
            lines.append(f"| **`{method}`** | (the baseline) |")
            continue
        keys = sorted(k for k in set(ref) | set(cfg) if ref.get(k) != cfg.get(k))
        swapped = sorted({k.split(".")[0] for k in keys if k.endswith(".name") and k.count(".") == 1})
        parts = [f"{g}={cfg.get(g + '.name')} (baseline: {ref.get(g + '.name')})" for g in swapped]
        parts += [f"{k}={cfg.get(k)} (baseline: {ref.get(k)})" for k in keys if k.split(".")[0] not in swapped]
        lines.append(f"| `{method}` | {'; '.join(parts) or 'nothing'} |")
    lines.append("")
    for method, cell in cells.items():
        lines.append(f"<!-- include-yaml: {cell}/{store.CONFIG_FILE} | {method} -->")
    return lines


def _numeric(levels: list[str]) -> bool:
    try:
        [float(v) for v in levels]
    except (TypeError, ValueError):
        return False
    return len(levels) >= 2


def sensitivity_section(runs: pd.DataFrame, metric: str) -> list[str]:
    """For every numeric axis (a hyperparameter sweep, e.g. train.lr): the learning-curve AUC across the sweep for
    each combination of the other axes, the best value in bold, flagged when it sits at an edge of the sweep (the
    optimum may lie outside it)."""
    axes = [c for c in runs.columns if c.startswith("axis:") and runs[c].nunique() > 1]
    lines: list[str] = []
    for axis in axes:
        levels = sorted(runs[axis].dropna().unique(), key=float) if _numeric(list(runs[axis].dropna().unique())) else []
        if not levels:
            continue
        others = [a for a in axes if a != axis]
        lines += ["", f"## Sensitivity to {axis[5:]}", "",
                  f"AUC of {short(metric)} over NFE (mean [95% t interval] over seeds) across the sweep of "
                  f"{axis[5:]}, per combination of the other axes; the best in bold, and 'at the edge' when the best "
                  "is the sweep's smallest or largest value (widen the sweep).", "",
                  "| " + " | ".join([*(o[5:] for o in others), *levels, "best"]) + " |",
                  "|---" * (len(others) + len(levels) + 1) + "|"]
        groups = runs.groupby(others, sort=True) if others else [((), runs)]
        for key, g in groups:
            key = key if isinstance(key, tuple) else (key,)
            means = {lv: g[g[axis] == lv].auc.mean() for lv in levels if (g[axis] == lv).any()}
            if not means:
                continue
            best = max(means, key=lambda lv: means[lv])
            cells = [(f"**{ci_text(g[g[axis] == lv].auc)}**" if lv == best else ci_text(g[g[axis] == lv].auc))
                     if lv in means else "—" for lv in levels]
            edge = " (at the edge)" if best in (levels[0], levels[-1]) else ""
            lines.append("| " + " | ".join([*map(str, key), *cells, f"{best}{edge}"]) + " |")
    return lines
