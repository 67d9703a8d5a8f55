"""The shapes world's held-out judge: a small CNN that reads a scene cell by cell, never used as a reward.

It is a learned model (the GenEval-mini scorer is rule-based), trained on rendered scenes with pixel noise; its
per-cell shape and colour predictions become detections that GenEval's rules score as the scorer's do. When a
policy raises the scorer's reward while this judge's score falls, the images exploit the detector's rules.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from bench.core.errors import UserError
from bench.rewards.geneval_mini import Detection
from bench.worlds.shapes_model import WEIGHTS_DIR, config_hash
from bench.worlds.shapes_scene import CELL, COLORS, GRID, SHAPES, Obj, random_obj, render_batch

JUDGE_WEIGHTS = WEIGHTS_DIR / "shapes_judge.safetensors"
JUDGE: dict[str, Any] = {"version": 1, "seed": 1, "steps": 200, "batch": 64, "lr": 2e-3, "max_noise": 0.15,
                         "max_objects": 6, "width": 32}


class ShapesJudge(nn.Module):
    """Image [B, 3, 24, 24] in [0, 1] -> per-cell logits: shape (none + 3) and colour (4), each [B, 9, K]."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.SiLU(), nn.Conv2d(width, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, 2 * width, CELL, stride=CELL), nn.SiLU())  # one feature vector per 8 x 8 cell
        self.shape_head = nn.Conv2d(2 * width, 1 + len(SHAPES), 1)
        self.color_head = nn.Conv2d(2 * width, len(COLORS), 1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(images * 2 - 1)
        return (self.shape_head(h).flatten(2).transpose(1, 2), self.color_head(h).flatten(2).transpose(1, 2))


def random_scenes(rng: np.random.Generator, n: int, max_objects: int) -> list[list[Obj]]:
    """Scenes of 0..max_objects random objects in distinct random cells."""
    out = []
    for _ in range(n):
        k = int(rng.integers(0, max_objects + 1))
        out.append([random_obj(rng, c) for c in rng.permutation(GRID * GRID)[:k].tolist()])
    return out


def cell_labels(scenes: list[list[Obj]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cell targets: shape index (0 = empty, 1 + SHAPES index) and colour index (-100 where empty)."""
    shape = torch.zeros(len(scenes), GRID * GRID, dtype=torch.long)
    color = torch.full((len(scenes), GRID * GRID), -100, dtype=torch.long)
    for i, s in enumerate(scenes):
        for o in s:
            shape[i, o.cell] = 1 + SHAPES.index(o.shape)
            color[i, o.cell] = COLORS.index(o.color)
    return shape, color


def train_judge(cfg: Mapping[str, Any] = JUDGE, log: Callable[[str], None] = print) -> dict[str, torch.Tensor]:
    """Cross-entropy on rendered scenes with Gaussian pixel noise of a random scale; deterministic in cfg."""
    rng = np.random.default_rng(int(cfg["seed"]))
    gen = torch.Generator().manual_seed(int(cfg["seed"]))
    torch.manual_seed(int(cfg["seed"]))
    model = ShapesJudge(int(cfg["width"]))
    opt = torch.optim.Adam(model.parameters(), lr=float(cfg["lr"]))
    ce = nn.CrossEntropyLoss()
    for step in range(1, int(cfg["steps"]) + 1):
        scenes = random_scenes(rng, int(cfg["batch"]), int(cfg["max_objects"]))
        x = render_batch(scenes)
        sigma = torch.rand(len(x), 1, 1, 1, generator=gen) * float(cfg["max_noise"])
        x = (x + sigma * torch.randn(x.shape, generator=gen)).clamp(0, 1)
        ys, yc = cell_labels(scenes)
        ls, lc = model(x)
        loss = ce(ls.reshape(-1, ls.shape[-1]), ys.reshape(-1)) + ce(lc.reshape(-1, lc.shape[-1]), yc.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0:
            log(f"judge step {step} loss {loss.item():.4f}")
    return model.state_dict()


def load_judge(path: Path = JUDGE_WEIGHTS, cfg: Mapping[str, Any] = JUDGE) -> ShapesJudge:
    """The shipped judge (eval mode, frozen); UserError if missing or made by another config."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not Path(path).exists():
        raise UserError(f"shapes judge weights {path} not found; create them with "
                        "`python scripts/pretrain_shapes.py --judge`")
    with safe_open(str(path), "pt") as f:
        got = (f.metadata() or {}).get("config_hash")
    if got != config_hash(cfg):
        raise UserError(f"shapes judge weights {path} have config hash {got}, but the judge config hashes to "
                        f"{config_hash(cfg)}; rerun `python scripts/pretrain_shapes.py --judge`")
    model = ShapesJudge(int(cfg["width"]))
    model.load_state_dict(load_file(str(path)))
    return model.eval().requires_grad_(False)


@torch.no_grad()
def judge_detections(judge: ShapesJudge, images: torch.Tensor) -> list[list[Detection]]:
    """The judge's objects per image: one per non-empty cell, with the cell's 7-pixel box."""
    ls, lc = judge(images.float().cpu())
    shapes, colors = ls.argmax(-1), lc.argmax(-1)
    out = []
    for i in range(len(images)):
        dets = []
        for cell in range(GRID * GRID):
            k = int(shapes[i, cell])
            if k:
                x0, y0 = (cell % GRID) * CELL, (cell // GRID) * CELL
                dets.append(Detection(SHAPES[k - 1], COLORS[int(colors[i, cell])],
                                      (float(x0), float(y0), float(x0 + CELL - 1), float(y0 + CELL - 1))))
        out.append(dets)
    return out
