"""What a world declares about its evaluation: the eval figures it reports and its collapse / reward-hacking
detectors, each with the real data's own value where the world knows it. The report shows only what the world
declares, and gives no hacking verdict (in either direction) for a world without detectors."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Detector:
    """One collapse or hacking sign, checked per seed against that seed's own curve and the real data.

    kind "floor": flagged when the final value is below `factor` x the real data's value (diversity collapse).
    kind "ceiling": flagged when the final value is above `factor` x the real data's value and has risen by more
    than `rise` from the seed's own best (lowest) value (samples drifting off the data).
    kind "gap": flagged when `metric` minus `partner` (the reward judge minus a held-out judge) has grown by more
    than `rise` over the seed's first eval (the reward model accepts what an independent one rejects).
    """

    metric: str
    kind: str
    label: str
    reference: float | None = None
    factor: float = 1.0
    rise: float = 0.0
    partner: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("floor", "ceiling", "gap"):
            raise ValueError(f"detector kind '{self.kind}'; valid: floor, ceiling, gap")
        if self.kind == "gap" and self.partner is None:
            raise ValueError("a gap detector needs a partner metric")
        if self.kind != "gap" and self.reference is None:
            raise ValueError(f"a {self.kind} detector needs the real data's value")
