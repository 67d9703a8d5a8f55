"""The estimator fidelity lab (`python -m bench.run grid=estimator_fidelity`): how well does each likelihood
estimator track the exact log-ratio log pi_theta(x) / pi_old(x)? (The claim of arXiv 2602.04663 under test.)

On the digits world the CNF log-likelihood of the model's ODE is computable (estimators/exact.py), so the lab
trains one cell for the grid's `updates` (one optimizer step each), draws samples from the base policy (the old
policy, pi_old) with each SDE sampler, and on the same samples compares every estimator setting's log-ratio
with the exact one: bias, variance, Spearman correlation, sign agreement and NFEs per estimate. The stepwise
estimator estimates the *path* log-ratio of the SDE trajectory; its agreement with the exact *marginal*
log-ratio of the final sample is what the table reports for it.
"""
from __future__ import annotations

import itertools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch
import yaml
from omegaconf import DictConfig, OmegaConf

from bench.core.lazy import lazy_module

matplotlib.use("Agg")  # before pyplot loads (at its first use)
plt = lazy_module("matplotlib.pyplot")
pd = lazy_module("pandas")
sps = lazy_module("scipy.stats")

from bench.runner import store
from bench.runner.components import build_world, plain
from bench.runner.config import compose_config
from bench.runner.resolve import resolve_cell
from bench.core.errors import UserError
from bench.core.meter import ComputeMeter
from bench.core.policy import PolicyCall
from bench.reporting.report_html import write_html
from bench.training.train import train_cell
from estimators import ESTIMATORS
from estimators.base import Estimator
from samplers import SAMPLERS
from samplers.rollout import Rollout

TRAIN_DIR = "train"


@dataclass
class Setting:
    """One estimator configuration measured by the lab, reading the final samples of rollout `on`."""

    name: str
    estimator: str
    options: dict[str, Any]
    on: str


def lab_settings(grid: DictConfig) -> list[Setting]:
    """Stepwise on each SDE's own rollouts, the ELBO product (J x weighting x crn) and any extra ELBO settings."""
    out = [Setting(f"stepwise[{s}]", "stepwise", {}, s) for s in grid.stepwise]
    elbo = plain(grid.elbo)
    on = grid.elbo_on
    for j, w, crn in itertools.product(elbo["J"], elbo["weighting"], elbo["crn"]):
        out.append(Setting(f"elbo J={j} {w} {'crn' if crn else 'indep'}", "elbo",
                           {"J": j, "weighting": w, "crn": crn}, on))
    extras = grid.get("elbo_extra")
    for extra in OmegaConf.to_container(extras, resolve=True) if extras else []:
        label = " ".join(f"{k}={v}" for k, v in extra.items() if k not in ("J", "weighting", "crn"))
        crn = extra.get("crn", True)
        out.append(Setting(f"elbo J={extra['J']} {extra['weighting']} {'crn' if crn else 'indep'} {label}", "elbo",
                           dict(extra), on))
    return out


def train_snapshots(cell_overrides: list[str], grid: DictConfig, train_dir: Path) -> dict[int, dict]:
    """Policies after each of grid.updates RL updates: one cell trained in stages, resuming its own checkpoint."""
    snaps = {}
    recipe = json.dumps([*cell_overrides, *grid.train_overrides])
    stamp = train_dir / "lab_recipe.json"
    if stamp.exists() and stamp.read_text() != recipe:
        raise UserError(f"{train_dir} holds snapshots trained with {stamp.read_text()}, not {recipe}; "
                        "delete it to retrain")
    train_dir.mkdir(parents=True, exist_ok=True)
    store.atomic_write_text(stamp, recipe)
    for u in sorted(int(x) for x in grid.updates):
        # Each snapshot is kept on its own: a rerun reuses it, since the cell's checkpoint may be further along.
        path = train_dir / f"policy_after_{u}.pt"
        if not path.exists():
            cfg = compose_config([*cell_overrides, *grid.train_overrides, "train.minibatches=1", "train.epochs=1",
                                  f"budget.iterations={u}", "budget.nfe=null", "budget.device_hours=null",
                                  "eval.every_nfe=null", f"eval.every={max(int(x) for x in grid.updates)}"])
            train_cell(cfg, train_dir)
            ckpt = store.load_checkpoint(train_dir)
            if ckpt["iteration"] != u:
                raise RuntimeError(f"{train_dir} holds a checkpoint at iteration {ckpt['iteration']}, not {u}; "
                                   "delete the folder to retrain the snapshots")
            torch.save(ckpt["params"], path)
        snaps[u] = torch.load(path, weights_only=True)  # a dict of tensors: no pickle needed
    return snaps


def path_log_ratio(est: Estimator, model_theta: PolicyCall, model_old: PolicyCall, rollout: Rollout,
                   gen: torch.Generator) -> torch.Tensor:
    """[L] sum over each final sample's stochastic edges of log pi_theta(edge) - log pi_old(edge) (stepwise)."""
    units = est.units(rollout)
    logp = est.estimate(model_theta, rollout, units, {}).logp
    logp_old = est.old_logp(model_old, rollout, units, {}, gen, True)
    slot_of_leaf = torch.full((rollout.num_nodes,), -1, dtype=torch.long)
    slot_of_leaf[rollout.leaves] = torch.arange(len(rollout.leaves))
    leaf = slot_of_leaf[rollout.leaf_of()[units]]
    return torch.zeros(len(rollout.leaves)).index_add(0, leaf, (logp - logp_old).float())


def sample_log_ratio(est: Estimator, model_theta: PolicyCall, model_old: PolicyCall, rollout: Rollout,
                     gen: torch.Generator) -> torch.Tensor:
    """[L] log pi_theta(x0) - log pi_old(x0) of a final-sample estimator (draws shared when it uses CRN)."""
    units = est.units(rollout)
    draws = est.prepare(rollout, units, gen)
    logp = est.estimate(model_theta, rollout, units, draws).logp
    return logp - est.old_logp(model_old, rollout, units, draws, gen, False)


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    """Per setting and update: bias, spread, rank and sign agreement (plus update = 'all', pooled over updates, kept
    in fidelity.parquet for the draw std and cost columns; the report's statistics are per update)."""
    rows = []
    groups = [(k, g) for k, g in df.groupby(["setting", "update"], sort=False)]
    groups += [((s, "all"), g) for s, g in df.groupby("setting", sort=False)]
    for (setting, update), g in groups:
        first = g[g.repeat == 0]
        resid = g.estimate - g.exact
        noise = g.groupby(["update", "sample"]).estimate.var(ddof=1) if g.repeat.max() > 0 else pd.Series([0.0])
        slope = np.polyfit(first.exact, first.estimate, 1)[0] if first.exact.std() > 0 else float("nan")
        rows.append({
            "setting": setting, "update": str(update), "estimator": g.estimator.iloc[0], "samples": len(first),
            "nfe_per_estimate": g.nfe_per_estimate.iloc[0],
            "spearman": sps.spearmanr(first.estimate, first.exact).statistic,
            "pearson": float(np.corrcoef(first.estimate, first.exact)[0, 1]),
            "sign_agreement": float((np.sign(g.estimate) == np.sign(g.exact)).mean()),
            "bias": float(resid.mean()), "variance": float(resid.var(ddof=1)),
            "draw_std": float(math.sqrt(max(noise.mean(), 0.0))), "slope": float(slope),
            "exact_mean": float(first.exact.mean()), "exact_std": float(first.exact.std()),
        })
    return pd.DataFrame(rows)


def scatter_plot(df: pd.DataFrame, table: pd.DataFrame, path: Path) -> Path:
    """Estimated vs exact log-ratio, one panel per setting, one colour per number of updates."""
    settings = list(dict.fromkeys(df.setting))
    cols = 6
    rows = math.ceil(len(settings) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.4 * rows), squeeze=False)
    colours = dict(zip(sorted(df["update"].unique()), ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9"]))
    per = table[table["update"] != "all"].set_index(["setting", "update"])
    for ax, setting in zip(axes.flat, settings):
        g = df[(df.setting == setting) & (df.repeat == 0)]
        for u, gu in g.groupby("update"):
            ax.scatter(gu.exact, gu.estimate, s=5, alpha=0.6, color=colours[u], label=f"{u} upd.")
        lo, hi = g.exact.min(), g.exact.max()
        ax.plot([lo, hi], [lo, hi], color="grey", lw=0.7, ls="--")
        rho = ", ".join(f"{u}: {per.loc[(setting, str(u)), 'spearman']:.2f}" for u in sorted(g["update"].unique()))
        ax.set_title(f"{setting}\nSpearman per update count {rho}", fontsize=6.5)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(settings):]:
        ax.axis("off")
    axes[0][0].legend(fontsize=6, markerscale=2)
    fig.supxlabel("exact log-ratio log pi_theta(x) / pi_old(x) (nats, CNF)", fontsize=9)
    fig.supylabel("estimated log-ratio", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def render(table: pd.DataFrame, meta: dict) -> str:
    """report.md: the setup, the exact log-ratios' scale, and one row per estimator setting."""
    updates = [u for u in dict.fromkeys(table["update"]) if u != "all"]
    pooled = table[table["update"] == "all"].set_index("setting")
    lines = [
        "# Estimator fidelity: estimated vs exact log-ratio", "",
        f"Policies after {', '.join(updates)} RL updates of `{meta['train_method']}` (one optimizer step per update) "
        f"against the base policy pi_old. {meta['samples']} final samples per SDE sampler drawn from pi_old "
        f"({', '.join(meta['rollouts'])}, {meta['steps']} steps); every estimator is evaluated on the same samples "
        f"({meta['repeats']} independent draws of its randomness per sample). Ground truth: the CNF log-likelihood "
        f"of the ODE ({meta['exact']}), all quantities in nats (reduce=sum). Sample counts are chosen so the lab "
        f"runs within 10 minutes on 2 CPU cores; this run took {meta['wall_s']:.0f} s wall "
        f"({meta['cpu_s']:.0f} s CPU).", "",
        "**Stepwise rows estimate the path log-ratio** of the SDE trajectory (sum over its Gaussian transitions), "
        "not the marginal log-ratio of the final sample; their columns measure how well that path quantity tracks "
        "the exact marginal log-ratio. Spearman and Pearson use one draw per sample; bias and variance are of "
        "(estimate - exact) over samples and draws; draw std is the spread between draws on the same sample "
        "(estimator noise alone); slope is the least-squares slope of estimate on exact (1 for a calibrated "
        "estimator; the uniform/adaptive/t weightings are not in nats). NFE is model evaluations per log-ratio "
        "(both policies; stepwise reads pi_old from the rollout).", "",
        "## Exact log-ratios", "",
        "| updates | mean | std | mean abs |", "|---|---|---|---|",
    ]
    for u in updates:
        ex = meta["exact_scale"][u]
        lines.append(f"| {u} | {ex['mean']:.4f} | {ex['std']:.4f} | {ex['abs']:.4f} |")
    per_update = table[table["update"] != "all"].set_index(["setting", "update"])
    lines += ["", "## Summary", ""]
    for u in updates:
        g = per_update.xs(u, level="update")
        best = g.spearman.idxmax()
        near = g[g.spearman >= g.spearman.max() - 0.05].sort_values("nfe_per_estimate")
        lines.append(f"- After {u} update{'' if u == '1' else 's'}: the best rank agreement with the exact log-ratio is `{best}` (Spearman "
                     f"{g.spearman.max():.3f}, {g.nfe_per_estimate[best]:.0f} NFE per estimate); the cheapest within "
                     f"0.05 of it is `{near.index[0]}` ({near.spearman.iloc[0]:.3f}, "
                     f"{near.nfe_per_estimate.iloc[0]:.0f} NFE); sign agreement ranges "
                     f"{g.sign_agreement.min():.2f}-{g.sign_agreement.max():.2f}.")
    lines += ["", "Every statistic is per number of updates: the log-ratios grow with the updates, so a statistic "
              "pooled over them would rank estimators by how well they separate update counts rather than samples.", ""]
    lines += ["## Estimators", "",
              "| setting | NFE | " + " | ".join(f"Spearman @{u} | sign agr. @{u} | bias @{u} | variance @{u} | slope @{u}"
                                              for u in updates) + " | draw std |",
              "|---" * (3 + 5 * len(updates)) + "|"]
    for setting, r in pooled.iterrows():
        cells = []
        for u in updates:
            q = per_update.loc[(setting, u)]
            cells.append(f"**{q.spearman:.3f}** | {q.sign_agreement:.3f} | {q.bias:.3g} | {q.variance:.3g} | {q.slope:.3g}")
        lines.append(f"| {setting} | {r.nfe_per_estimate:.0f} | " + " | ".join(cells) + f" | {r.draw_std:.3g} |")
    lines += ["", "## Plot", "", "![estimated vs exact log-ratio](scatter.png)", ""]
    return "\n".join(lines)


def run_fidelity(grid_name: str, base: DictConfig, cell_overrides: list[str], grid_dir: Path) -> int:
    """Train the snapshots, measure every setting, write fidelity.parquet, samples.parquet, scatter.png, report.md."""
    t0, cpu0 = time.perf_counter(), time.process_time()
    grid = base.grid
    snaps = train_snapshots(cell_overrides, grid, grid_dir / TRAIN_DIR)
    world = build_world(base)
    policy = world.build_policy()
    meter = ComputeMeter(device=world.device)
    old = PolicyCall(policy, meter)
    gen = torch.Generator().manual_seed(int(base.seed))
    n, repeats = int(grid.samples), int(grid.repeats)
    exact = ESTIMATORS.get("exact")({**plain(grid.exact), "reduce": "sum"})
    settings = lab_settings(grid)
    rollouts_used = list(dict.fromkeys([s.on for s in settings]))
    est_cfg = {name: plain(resolve_cell(compose_config([*cell_overrides, f"estimator={name}"])).estimator)
               for name in {s.estimator for s in settings}}
    rows, exact_scale = [], {}
    with meter.phase("eval"), torch.no_grad():
        prompts = world.sample_prompts(n, gen)
        cond = world.encode(prompts)
        rollouts, exact_old = {}, {}
        for name in rollouts_used:
            scfg = plain(resolve_cell(compose_config([*cell_overrides, f"sampler={name}"])).sampler)
            rollouts[name] = SAMPLERS.get(name)(scfg).sample(old, prompts, cond, 1, world.latent_shape, gen)
            exact_old[name] = exact.estimate(old, rollouts[name], rollouts[name].leaves, {}).logp
        for update, params in snaps.items():
            theta = old.with_params(params)
            truth = {name: exact.estimate(theta, r, r.leaves, {}).logp - exact_old[name]
                     for name, r in rollouts.items()}
            t = truth[rollouts_used[0]]
            exact_scale[str(update)] = {"mean": t.mean().item(), "std": t.std().item(), "abs": t.abs().mean().item()}
            for s in settings:
                est = ESTIMATORS.get(s.estimator)({**est_cfg[s.estimator], **s.options, "reduce": "sum"})
                draws = 1 if s.estimator == "stepwise" else repeats  # a stored path has no randomness to redraw
                before = meter.current.eval_forwards
                for rep in range(draws):
                    fn = path_log_ratio if s.estimator == "stepwise" else sample_log_ratio
                    val = fn(est, theta, old, rollouts[s.on], gen)
                    rows += [{"setting": s.name, "estimator": s.estimator, "update": update, "sample": i,
                              "repeat": rep, "estimate": float(val[i]), "exact": float(truth[s.on][i])}
                             for i in range(n)]
                nfe = (meter.current.eval_forwards - before) / (draws * n)
                for row in rows[-draws * n:]:
                    row["nfe_per_estimate"] = nfe
    df = pd.DataFrame(rows)
    table = summarise(df)
    df.to_parquet(grid_dir / "samples.parquet", index=False)
    table.to_parquet(grid_dir / "fidelity.parquet", index=False)
    scatter_plot(df, table, grid_dir / "scatter.png")
    steps = plain(resolve_cell(compose_config([*cell_overrides, f"sampler={rollouts_used[0]}"])).sampler).get("steps")
    meta = {"train_method": " ".join(grid.train_overrides) or "the base config", "samples": n, "repeats": repeats,
            "rollouts": rollouts_used, "steps": steps, "exact_scale": exact_scale,
            "exact": ", ".join(f"{k}={v}" for k, v in plain(grid.exact).items()),
            "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - cpu0}
    store.atomic_write_text(grid_dir / "grid.yaml", yaml.safe_dump({**plain(grid), "name": grid_name}, sort_keys=False))
    report = grid_dir / "report.md"
    store.atomic_write_text(report, render(table, meta))
    write_html(report)
    per_update = table[table["update"] != "all"]
    print(per_update[["setting", "update", "nfe_per_estimate", "spearman", "sign_agreement", "bias"]].to_string(index=False))
    print(f"estimator fidelity: {len(settings)} settings x {len(snaps)} policies in {meta['wall_s']:.0f} s -> {report}")
    return 0
