"""Where a window of consecutive SDE steps sits at each iteration (MixGRPO's sliding window, TreeGRPO's branching window)."""
from __future__ import annotations

from typing import Any, Mapping

import torch

from bench.errors import UnknownChoice, UserError

WINDOW_SCHEDULES = ("fixed", "random", "progressive")


class WindowSchedule:
    """The start step of a `width`-step window at a training iteration (iterations count from 1).

    Config keys: `schedule` (fixed | random | progressive), `range: [lo, hi]` of allowed starts (default
    [0, steps - width], the window always fits), `start` (fixed start, or where progressive begins; default lo),
    `stride` and `every` (progressive: move by `stride` steps every `every` iterations; stride < width makes
    consecutive windows overlap, as MixGRPO's prog_overlap), `roll_back` (progressive past hi: back to `start`
    instead of staying at hi). The progressive start is a function of the iteration alone, so resuming a cell
    from a checkpoint continues the same schedule.
    """

    def __init__(self, cfg: Mapping[str, Any] | None, steps: int, width: int):
        cfg = dict(cfg or {})
        self.kind = str(cfg.get("schedule", "fixed"))
        if self.kind not in WINDOW_SCHEDULES:
            raise UnknownChoice("window schedule", self.kind, list(WINDOW_SCHEDULES))
        if not 1 <= width <= steps:
            raise UserError(f"window width {width} must be between 1 and steps={steps}")
        self.width = int(width)
        lo, hi = cfg.get("range") or (0, steps - width)
        self.lo, self.hi = int(lo), int(hi)
        if not 0 <= self.lo <= self.hi <= steps - width:
            raise UserError(f"window range [{lo}, {hi}] must satisfy 0 <= lo <= hi <= steps - width = {steps - width}")
        start = cfg.get("start")
        self.first = self.lo if start is None else int(start)
        if not self.lo <= self.first <= self.hi:
            raise UserError(f"window start {self.first} outside its range [{self.lo}, {self.hi}]")
        self.stride, self.every = int(cfg.get("stride", 1)), int(cfg.get("every", 1))
        if self.stride < 1 or self.every < 1:
            raise UserError(f"window stride ({self.stride}) and every ({self.every}) must be >= 1")
        self.roll_back = bool(cfg.get("roll_back", False))

    def start(self, iteration: int, generator: torch.Generator | None = None) -> int:
        """The window's first step at this iteration; `random` draws from `generator`."""
        if self.kind == "fixed":
            return self.first
        if self.kind == "random":
            return int(torch.randint(self.lo, self.hi + 1, (1,), generator=generator))
        moves = (max(int(iteration), 1) - 1) // self.every
        if self.roll_back:
            positions = (self.hi - self.first) // self.stride + 1
            return self.first + self.stride * (moves % positions)
        return min(self.first + self.stride * moves, self.hi)

    def mask(self, start: int, steps: int) -> torch.Tensor:
        """[steps] bool, True on the window's steps."""
        m = torch.zeros(steps, dtype=torch.bool)
        m[start:start + self.width] = True
        return m
