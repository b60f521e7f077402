"""Paired statistics over seeds.

Seed s fixes the initial weights and the data order, the same for every optimizer, so two
optimizers' runs at one seed form a pair and the seed-to-seed spread that both share cancels in
their difference. Per pair we take the difference of final losses (X − B) or the ratio of
speedups; over the pairs, the mean and its 95% Student-t interval (n − 1 degrees of freedom).
Ratios are averaged on the log scale (a geometric mean), so that 2x and 0.5x cancel.

A difference is called significant only when its interval excludes 0 (a ratio's, 1). With three
seeds the t quantile is 4.30: only a difference consistent across seeds clears it.
"""

from __future__ import annotations

import math
import statistics
from typing import Sequence

__all__ = ["paired_difference", "paired_ratio", "t_quantile"]


def t_quantile(df: int, level: float = 0.95) -> float:
    """Two-sided Student-t quantile for ``df`` degrees of freedom (scipy)."""
    from scipy.stats import t

    return float(t.ppf(0.5 + level / 2, df))


def _interval(values: list[float], level: float) -> tuple[float, float, float] | None:
    if len(values) < 2:
        return None
    mean = statistics.fmean(values)
    half = t_quantile(len(values) - 1, level) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def paired_difference(x: Sequence[float | None], b: Sequence[float | None], level: float = 0.95) -> dict:
    """Mean of ``x[i] − b[i]`` over the pairs where both are finite, with its interval.

    ``significant`` is True/False when the interval excludes/includes 0, None with fewer than 2 pairs.
    """
    diffs = [xi - bi for xi, bi in zip(x, b) if _finite(xi) and _finite(bi)]
    found = _interval(diffs, level)
    if found is None:
        return {"n": len(diffs), "mean": diffs[0] if diffs else None, "low": None, "high": None,
                "significant": None, "per_seed": diffs}
    mean, low, high = found
    return {"n": len(diffs), "mean": mean, "low": low, "high": high, "significant": not low <= 0.0 <= high,
            "per_seed": diffs}


def paired_ratio(ratios: Sequence[float | None], level: float = 0.95) -> dict:
    """Geometric mean of per-seed ratios with its interval (computed on logs, then exponentiated).

    ``significant`` is True/False when the interval excludes/includes 1.
    """
    logs = [math.log(r) for r in ratios if _finite(r) and r > 0]
    found = _interval(logs, level)
    if found is None:
        return {"n": len(logs), "mean": math.exp(logs[0]) if logs else None, "low": None, "high": None,
                "significant": None, "per_seed": list(ratios)}
    mean, low, high = (math.exp(v) for v in found)
    return {"n": len(logs), "mean": mean, "low": low, "high": high, "significant": not low <= 1.0 <= high,
            "per_seed": list(ratios)}


def _finite(v) -> bool:
    return v is not None and math.isfinite(v)
