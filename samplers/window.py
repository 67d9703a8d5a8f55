"""Where a window of consecutive SDE steps sits at each iteration (MixGRPO's sliding window, TreeGRPO's branching window)."""
from __future__ import annotations

from typing import Any, Mapping

import torch

from bench.core.errors import UnknownChoice, UserError
from bench.core.schema import Option

WINDOW_SCHEDULES = ("fixed", "random", "progressive")


def window_options(schedule: str) -> dict[str, Option]:
    """The keys of a `window:` mapping (a WindowSchedule), with `schedule`'s default."""
    return {
        "schedule": Option(schedule, str, choices=WINDOW_SCHEDULES),
        "start": Option(None, int, low=0, nullable=True, help="fixed start / progressive's first start; null = lo"),
        "range": Option(None, list, nullable=True, length=2, item=Option(0, int, low=0),
                        help="[lo, hi] of starts; null = [0, steps - width]"),
        "stride": Option(1, int, low=1, help="progressive: steps moved per shift"),
        "every": Option(1, int, low=1, help="progressive: iterations between shifts"),
        "roll_back": Option(False, bool, help="progressive past hi: back to start (true) or stay (false)"),
        "end_margin": Option(0, int, low=0, help="window steps stay below steps - end_margin and the window shrinks "
                                                  "near it (MixGRPO: 2, its max_timesteps = T - 2)"),
    }


class WindowSchedule:
    """The start step of a `width`-step window at a training iteration (iterations count from 1).

    Config keys: `schedule` (fixed | random | progressive), `range: [lo, hi]` of allowed starts (default
    [0, steps - width], the window always fits), `start` (fixed start, or where progressive begins; default lo),
    `stride` and `every` (progressive: move by `stride` steps every `every` iterations; stride < width makes
    consecutive windows overlap, as MixGRPO's prog_overlap), `roll_back` (progressive past hi: back to `start`
    instead of staying at hi), `end_margin` (MixGRPO's max_timesteps = steps - 2: windows end at
    min(start + width, steps - end_margin), so they shrink near that limit; progressive starts run to the limit,
    where the window is empty, and random ones are drawn from [0, limit - width]). The progressive start is a function of the iteration
    alone, so resuming a cell from a checkpoint continues the same schedule.
    """

    def __init__(self, cfg: Mapping[str, Any] | None, steps: int, width: int):
        cfg = dict(cfg or {})
        self.kind = str(cfg.get("schedule", "fixed"))
        if self.kind not in WINDOW_SCHEDULES:
            raise UnknownChoice("window schedule", self.kind, list(WINDOW_SCHEDULES))
        if not 1 <= width <= steps:
            raise UserError(f"window width {width} must be between 1 and steps={steps}")
        self.width = int(width)
        margin = int(cfg.get("end_margin") or 0)
        self.limit = steps - margin
        if margin and not width <= self.limit:
            raise UserError(f"window end_margin={margin}: leaves {self.limit} steps for a window of {width}; "
                            f"valid: end_margin <= steps - width = {steps - width}")
        # With a margin (MixGRPO) a progressive window shrinks near the limit and, at start = limit, is empty for one
        # iteration per cycle (MixGRPO trains nothing then); without a margin it always fits.
        top = self.limit if margin and self.kind == "progressive" else self.limit - width
        lo, hi = cfg.get("range") or (0, top)
        self.lo, self.hi = int(lo), int(hi)
        if not 0 <= self.lo <= self.hi <= top:
            raise UserError(f"window range [{lo}, {hi}] must satisfy 0 <= lo <= hi <= {top}")
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
        m[start:min(start + self.width, self.limit)] = True
        return m
