"""Pretrain the shapes world's base SD3 transformer (deterministic; CPU, one thread) and write its safetensors.

    nice -n 19 python scripts/pretrain_shapes.py [--steps N] [--out PATH] [--snapshots DIR]
    nice -n 19 python scripts/pretrain_shapes.py --judge [--out PATH]   # the held-out judge CNN

The config is bench.worlds.shapes_model.PRETRAIN (torch threads included: they change float reductions); the
file's header carries its hash, which the world checks at load time. --steps N is a shorter run (its cosine
schedule ends at N), with N in the recorded config.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.worlds.shapes_judge import JUDGE, JUDGE_WEIGHTS, train_judge  # noqa: E402
from bench.worlds.shapes_model import BASE_WEIGHTS, PRETRAIN, config_hash, pretrain, save_weights  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=PRETRAIN["steps"])
    ap.add_argument("--out", type=Path, default=None, help="default: bench/worlds/weights/shapes_{base,judge}")
    ap.add_argument("--judge", action="store_true", help="train the held-out judge CNN instead of the base model")
    ap.add_argument("--snapshots", type=Path, default=None, help="also save every --snapshot-every steps here")
    ap.add_argument("--snapshot-every", type=int, default=250)
    args = ap.parse_args()
    torch.set_num_threads(int(PRETRAIN["threads"]))
    start = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - start:7.0f}s] {msg}", flush=True)

    if args.judge:
        out = args.out or JUDGE_WEIGHTS
        save_weights(train_judge(JUDGE, log), out, JUDGE)
        log(f"wrote {out} (config hash {config_hash(JUDGE)})")
        return
    cfg = {**PRETRAIN, "steps": args.steps}

    def snap(step: int, state: dict) -> None:
        path = args.snapshots / f"shapes_base_step{step}.safetensors"
        save_weights(state, path, {**cfg, "steps": step})
        log(f"snapshot {path}")

    state = pretrain(cfg, log, snap if args.snapshots else None, args.snapshot_every)
    out = args.out or BASE_WEIGHTS
    save_weights(state, out, cfg)
    log(f"wrote {out} (config hash {config_hash(cfg)})")


if __name__ == "__main__":
    main()
