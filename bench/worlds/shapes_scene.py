"""Scenes of the shapes world: 1-4 coloured shapes on a 3 x 3 grid of cells, rendered exactly by code.

A scene is a list of objects (shape, colour, cell, size, offset). Every object lies inside its 8 x 8 cell and
leaves the cell's last row and column empty, so two objects never touch and connected components recover them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

RESOLUTION = 24
CELL = 8
GRID = RESOLUTION // CELL
SHAPES = ("circle", "square", "triangle")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles"}
# Saturated, well separated colours (RGB in [0, 1]); the background is black.
PALETTE = {"red": (1.0, 0.0, 0.0), "green": (0.0, 0.8, 0.0), "blue": (0.1, 0.3, 1.0), "yellow": (1.0, 0.9, 0.0)}
COLORS = tuple(PALETTE)
SIZES = (6, 7)  # side of the object's box in pixels; offset + size <= CELL - 1 keeps a 1-pixel gap


@dataclass(frozen=True)
class Obj:
    """One rendered object: its box is [x0, x0 + size) x [y0, y0 + size) in pixels."""

    shape: str
    color: str
    cell: int  # row-major in the 3 x 3 grid
    size: int = 7
    dx: int = 0
    dy: int = 0

    @property
    def x0(self) -> int:
        return (self.cell % GRID) * CELL + self.dx

    @property
    def y0(self) -> int:
        return (self.cell // GRID) * CELL + self.dy

    @property
    def box(self) -> tuple[float, float, float, float]:
        """[x1, y1, x2, y2] in pixels (GenEval's box convention)."""
        return (float(self.x0), float(self.y0), float(self.x0 + self.size), float(self.y0 + self.size))


def shape_mask(shape: str, size: int) -> np.ndarray:
    """The boolean size x size mask of a shape, from pixel-centre tests (no anti-aliasing, so exact)."""
    c = (np.arange(size) + 0.5)
    x, y = np.meshgrid(c, c)
    if shape == "square":
        return np.ones((size, size), bool)
    if shape == "circle":
        # A radius a little under size/2 trims the corners enough to tell a circle from a square at 6-7 px.
        r = size / 2 - 0.3
        return (x - size / 2) ** 2 + (y - size / 2) ** 2 <= r * r
    if shape == "triangle":
        # Apex at the top centre, base along the bottom row.
        return np.abs(x - size / 2) <= (y / size) * (size / 2) + 0.25
    raise ValueError(f"unknown shape {shape!r}")


def render(scene: Sequence[Obj]) -> torch.Tensor:
    """A scene -> RGB image [3, 24, 24] in [0, 1]."""
    img = np.zeros((RESOLUTION, RESOLUTION, 3), np.float32)
    for o in scene:
        m = shape_mask(o.shape, o.size)
        patch = img[o.y0:o.y0 + o.size, o.x0:o.x0 + o.size]
        patch[m] = PALETTE[o.color]
    return torch.from_numpy(img).permute(2, 0, 1).contiguous()


def render_batch(scenes: Sequence[Sequence[Obj]]) -> torch.Tensor:
    """Scenes -> [N, 3, 24, 24] in [0, 1]."""
    return torch.stack([render(s) for s in scenes]) if scenes else torch.zeros(0, 3, RESOLUTION, RESOLUTION)


def random_obj(rng: np.random.Generator, cell: int, shape: str | None = None, color: str | None = None) -> Obj:
    """An object in `cell` with random size and offset (and shape/colour unless given)."""
    size = int(rng.choice(SIZES))
    slack = CELL - 1 - size
    return Obj(shape or str(rng.choice(SHAPES)), color or str(rng.choice(COLORS)), int(cell), size,
               int(rng.integers(0, slack + 1)), int(rng.integers(0, slack + 1)))
