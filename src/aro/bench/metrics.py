"""The speedup metric (the paper's §5.1) on validation-loss curves.

The speedup of X over a baseline B at budget S is ``S / s_X``, where ``s_X`` is the first step
at which X's validation loss reaches B's final validation loss, found by linear interpolation
between evaluations. X runs the same schedule as B, so at ``s_X`` it is still mid-schedule, with
a higher learning rate than B had at its end: the metric **understates** X (a run of X scheduled
for ``s_X`` steps would do better). If X never reaches B's final loss, the ratio is taken the
other way round, ``s_B / S`` with ``s_B`` the step at which B reaches X's final loss: a value
below 1, the speedup of B over X inverted.
"""

from __future__ import annotations

import math
import statistics
from typing import Sequence

__all__ = ["first_crossing", "mean_std", "speedup"]


def first_crossing(steps: Sequence[float], losses: Sequence[float | None], target: float) -> float | None:
    """First (interpolated) step at which ``losses`` is at or below ``target``; None if never.

    A None loss (non-finite evaluation) ends the curve.
    """
    prev_s = prev_l = None
    for s, loss in zip(steps, losses):
        if loss is None or not math.isfinite(loss):
            return None
        if loss <= target:
            if prev_l is None or prev_l == loss:
                return float(s)
            return prev_s + (prev_l - target) * (s - prev_s) / (prev_l - loss)
        prev_s, prev_l = s, loss
    return None


def speedup(x_steps: Sequence[float], x_losses: Sequence[float | None], b_steps: Sequence[float],
            b_losses: Sequence[float | None], budget: float) -> float | None:
    """Speedup of X over B at ``budget`` (see module docstring); None if undefined.

    Undefined when either curve has no finite final loss, or when B's final loss is not below
    the starting loss (B learned nothing, so 'reaching it' means nothing).
    """
    x_final, b_final = x_losses[-1], b_losses[-1]
    if x_final is None or b_final is None or not (math.isfinite(x_final) and math.isfinite(b_final)):
        return None
    s_x = first_crossing(x_steps, x_losses, b_final)
    if s_x is not None:
        return budget / s_x if s_x > 0 else None
    s_b = first_crossing(b_steps, b_losses, x_final)
    return None if s_b is None else s_b / budget


def mean_std(values: Sequence[float | None]) -> dict:
    """``{"mean", "std", "per_seed"}``; std is the sample std (0 for one value); None-safe."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return {"mean": None, "std": None, "per_seed": list(values)}
    std = statistics.stdev(finite) if len(finite) > 1 else 0.0
    return {"mean": statistics.fmean(finite), "std": std, "per_seed": list(values)}
