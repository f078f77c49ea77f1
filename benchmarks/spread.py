"""A measured figure over rounds as the benchmarks report it: median and range."""

from __future__ import annotations

import statistics


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}
