"""Percentiles the benchmarks report."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def nearest_rank(values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile: a value that was observed, never an interpolation, so a
    p99 over few checkpoints is the worst of them rather than flattered."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    rank = max(1, int(np.ceil(fraction * len(ordered))))
    return ordered[rank - 1]
