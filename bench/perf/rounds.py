"""The benchmarks' one way to summarise timed rounds: a round is the mean of its iterations' figures, a table
cell the median over rounds (robust to a round hit by load from another process)."""
from __future__ import annotations

import statistics


def mean_row(rows: list[dict[str, float]]) -> dict[str, float]:
    """Per key, the mean over one round's iterations."""
    return {k: statistics.fmean(x[k] for x in rows) for k in rows[0]}


def median_row(rounds: list[dict[str, float]]) -> dict[str, float]:
    """Per key, the median over rounds."""
    return {k: statistics.median(x[k] for x in rounds) for k in rounds[0]}
