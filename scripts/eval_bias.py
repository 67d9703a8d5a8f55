"""How far a grid's recorded final evals sit from a large independent eval of the same weights (the eval bias).

    python scripts/eval_bias.py results/elbo_vs_stepwise [--samples-per-class 200] [--noise-seed 424242]

For every finished compared cell: its final checkpoint is loaded and evaluated on `samples-per-class` x 10 samples
of fresh noise; the printout gives, per method, the mean over seeds of (recorded - large eval) with a 95% t
interval, beside the t interval half-width of the method's recorded final figure. A bias well inside that width
cannot move a comparison; a bias shared by every seed (a fixed eval noise) does not average out.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import yaml
from omegaconf import OmegaConf

from bench.reporting.stats import mean_ci
from bench.runner import store
from bench.reporting.summary import read_manifest
from bench.training.train import build_state, resume


def compared_cell_dirs(grid_dir: Path) -> list[tuple[str, Path]]:
    """(method, folder) of the grid's finished compared cells (tuning runs and unfinished cells left out)."""
    return [(c.method, Path(grid_dir) / c.name) for c in read_manifest(grid_dir) or []
            if c.stage != "tune" and c.skip_reason is None
            and store.read_status(Path(grid_dir) / c.name)["status"] == "done"]


def large_eval(cell_dir: Path, per_class: int, noise_seed: int, metric: str) -> tuple[float, float] | None:
    """(recorded final metric, the same weights' metric on a large fresh-noise eval), or None if not comparable."""
    rows = [r for r in store.read_metrics(cell_dir) if metric in r]
    ckpt = store.load_checkpoint(cell_dir)
    if not rows or ckpt is None or int(ckpt["iteration"]) != int(rows[-1]["iteration"]):
        return None
    cfg = OmegaConf.create(yaml.safe_load((cell_dir / store.CONFIG_FILE).read_text()))
    s = build_state(cfg)
    resume(s, ckpt)
    s.world.cfg["eval"] = {**dict(s.world.cfg.get("eval") or {}), "samples_per_class": per_class,
                           "noise_seed": noise_seed}
    with s.meter.phase("eval"):
        return float(rows[-1][metric]), float(s.world.evaluate(s.model, None, "bias")[metric])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("grid_dir", type=Path)
    ap.add_argument("--samples-per-class", type=int, default=200)
    ap.add_argument("--noise-seed", type=int, default=424242)
    ap.add_argument("--metric", default="eval_accuracy")
    args = ap.parse_args()
    by_method: dict[str, list[tuple[float, float]]] = {}
    for method, cell_dir in compared_cell_dirs(args.grid_dir):
        got = large_eval(cell_dir, args.samples_per_class, args.noise_seed, args.metric)
        if got is not None:
            by_method.setdefault(method, []).append(got)
    print(f"| method | seeds | recorded final | large eval ({10 * args.samples_per_class} samples) | "
          "recorded - large [95% CI] | CI half-width of the recorded final |")
    print("|---|---|---|---|---|---|")
    out = {}
    for method, pairs in sorted(by_method.items()):
        rec, big = np.array(pairs).T
        bias, half = mean_ci(rec - big), mean_ci(rec)
        out[method] = {"bias": bias, "half_width": (half[2] - half[1]) / 2}
        print(f"| {method} | {len(rec)} | {rec.mean():.3f} | {big.mean():.3f} | {bias[0]:+.3f} [{bias[1]:+.3f}, "
              f"{bias[2]:+.3f}] | {(half[2] - half[1]) / 2:.3f} |")
    (args.grid_dir / "eval_bias.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
