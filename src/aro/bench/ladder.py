"""Budget ladders in the paper's unit (``aro bench --budgets 0.5,1,2,4,8``).

The protocol sweeps learning rates at budget 1 (20 tokens per parameter) and reuses each
optimizer's chosen lr at every other budget, as the paper's Figure 1 does; at the longest budget
the lr is checked at half and twice its value (seed 0), so a summary says whether the lr
transferred. A ladder of budget 1 alone needs no check for a swept lr, but does for an lr given
without a sweep (``--lr-by-optimizer``, e.g. reused from another model). Runs are ordered budget
by budget, then seed by seed, then optimizer by optimizer, so an interrupted ladder has finished
its short budgets for every optimizer first, and a resumed one redoes nothing (every run folder
with a ``result.json`` is read back).

Two speedups per budget K and baseline B:

* the crossing speedup (:mod:`aro.bench.metrics`): within one schedule of K, how early X reaches
  B's final loss. X is then mid-schedule, so this understates X;
* the schedule-fair speedup: the budget K* at which X's *final* loss (each point a whole
  schedule, the mean over that budget's seeds) equals B's final loss at K, interpolated linearly
  in log-budget between X's ladder points, and the speedup is K / K* ("X needs K*/K of the
  data"); where the ladder crosses the target twice, the crossing at the larger budget. Undefined
  (None) where B's loss lies outside X's ladder (no extrapolation; a bound is given instead).
"""

from __future__ import annotations

import math
from typing import Any, Callable

from .budget import budget_of_steps, budget_unit, steps_for_budget
from .optimizers import BASELINES
from .train import RunSpec

__all__ = ["LR_CHECK_FACTORS", "add_budget_blocks", "ladder_runs", "round_lr", "schedule_fair_bound",
           "schedule_fair_speedup"]

LR_CHECK_FACTORS = (0.5, 2.0)


def ladder_runs(cfg, chosen: dict[str, float]) -> list[RunSpec]:
    """The runs of the ladder beyond the budget-1 sweep and seeds, in the order they run."""
    if not cfg.budgets:
        return []
    specs = []
    for budget in sorted(k for k in cfg.budgets if k != 1):
        for seed in range(cfg.budget_seeds):
            specs += [RunSpec(name, chosen[name], seed, cfg.budget_steps(budget)) for name in cfg.optimizers]
    longest = max(cfg.budgets)
    for name in cfg.optimizers:
        if longest == 1 and len(cfg.lr_candidates(name)) > 1:
            continue  # the sweep at budget 1 is the check
        # a swept lr at a longer budget, or an lr given without a sweep (transferred from another
        # model) at any budget, is checked at half and twice its value
        specs += [RunSpec(name, round_lr(chosen[name] * f), 0, cfg.budget_steps(longest)) for f in LR_CHECK_FACTORS]
    return specs


def round_lr(lr: float) -> float:
    """``lr`` to 6 significant digits: 4e-3 * 2 is 0.008, not 0.008000000000000002."""
    return float(f"{lr:.6g}")


def _unit(cfg: dict) -> dict:
    return budget_unit(cfg["model"], cfg["batch_size"], cfg.get("tokens_per_parameter", 20.0))


def _budget_of(cfg: dict, steps: int) -> float:
    """The budget a run of ``steps`` steps belongs to: the configured budget with that step count,
    else the exact ratio (runs of a config without ``budgets``), to 3 significant digits."""
    unit = _unit(cfg)
    for budget in cfg.get("budgets") or ():
        if steps_for_budget(budget, unit) == steps:
            return float(budget)
    return float(f"{budget_of_steps(steps, unit):.3g}")


def add_budget_blocks(summary: dict, cfg: dict, chosen: dict[str, float], find: Callable,
                      budget_block: Callable) -> None:
    """Add ``budget_unit`` and, per optimizer, ``budgets`` {"K": block} to ``summary`` in place.

    ``budget_block(name, lr, steps, chosen, find)`` is the protocol's block of one budget (final
    loss over seeds, crossing speedups, paired intervals).
    """
    summary["budget_unit"] = _unit(cfg)
    steps_list = sorted(summary["budgets"])
    if not cfg.get("budgets"):  # an overtrain (k x steps) config: only the base budget is a ladder point
        steps_list = [summary["base_steps"]] if summary["base_steps"] in steps_list else []
    for name, entry in summary["optimizers"].items():
        lr = chosen[name]
        ladder: dict[str, Any] = {}
        for steps in steps_list:
            block = budget_block(name, lr, steps, chosen, find)
            if block is None:
                continue
            budget = _budget_of(cfg, steps)
            ladder[f"{budget:g}"] = {"budget": budget, "steps": steps, "lr": lr, **_slim(block)}
        if ladder and cfg.get("budgets"):
            longest = max(ladder.values(), key=lambda b: b["budget"])
            check = {r["spec"]["lr"]: r["final_val_loss"] for r in find(name, seed=0, steps=longest["steps"])}
            if len(check) > 1:
                finite = {k: v for k, v in check.items() if v is not None}
                longest["lr_check"] = {f"{k:g}": v for k, v in sorted(check.items())}
                longest["lr_transfers"] = bool(finite) and min(finite, key=finite.get) == lr
        entry["budgets"] = ladder
    _add_schedule_fair(summary)


def _slim(block: dict) -> dict:
    keep = ("seeds", "final_val_loss", "speedup", "final_loss_diff", "paired", "diverged", "step_time_s",
            "optimizer_step_time_s", "starved_experts")
    return {k: block[k] for k in keep if k in block}


def schedule_fair_speedup(budget: float, target_loss: float, ladder: list[tuple[float, float]]) -> float | None:
    """K / K*, where X's final loss, interpolated linearly in log-budget over ``ladder``
    ((budget, final loss) pairs of X), equals ``target_loss`` at K*. None outside the ladder."""
    points = sorted((k, loss) for k, loss in ladder if loss is not None and math.isfinite(loss))
    # a ladder that is not monotone can cross the target twice: take the crossing at the largest
    # budget, the least favourable to X
    for (k0, l0), (k1, l1) in reversed(list(zip(points, points[1:]))):
        lo, hi = min(l0, l1), max(l0, l1)
        if lo <= target_loss <= hi:
            if l0 == l1:
                k_star = k0
            else:
                t = (l0 - target_loss) / (l0 - l1)
                k_star = math.exp(math.log(k0) + t * (math.log(k1) - math.log(k0)))
            return budget / k_star
    if len(points) == 1 and points[0][1] == target_loss:
        return budget / points[0][0]
    return None


def schedule_fair_bound(budget: float, target_loss: float, ladder: list[tuple[float, float]]) -> dict | None:
    """Where :func:`schedule_fair_speedup` is undefined, what the ladder still says: X beats the
    target already at its smallest budget (``{"at_least": K / K_min}``) or not even at its
    largest (``{"at_most": K / K_max}``). None when the target lies inside the ladder."""
    points = sorted((k, loss) for k, loss in ladder if loss is not None and math.isfinite(loss))
    if not points:
        return None
    if all(loss < target_loss for _, loss in points):
        return {"at_least": budget / points[0][0]}
    if all(loss > target_loss for _, loss in points):
        return {"at_most": budget / points[-1][0]}
    return None


def _add_schedule_fair(summary: dict) -> None:
    optimizers = summary["optimizers"]
    for name, entry in optimizers.items():
        ladder = [(b["budget"], b["final_val_loss"]["mean"]) for b in entry.get("budgets", {}).values()]
        for block in entry.get("budgets", {}).values():
            fair, bounds = {}, {}
            for base, theirs in optimizers.items():
                if base == name or base not in BASELINES:
                    continue
                their_block = theirs.get("budgets", {}).get(f"{block['budget']:g}")
                if their_block and their_block["final_val_loss"]["mean"] is not None and len(ladder) > 1:
                    target = their_block["final_val_loss"]["mean"]
                    fair[base] = schedule_fair_speedup(block["budget"], target, ladder)
                    if fair[base] is None:
                        bounds[base] = schedule_fair_bound(block["budget"], target, ladder)
            block["schedule_fair_speedup"] = fair
            if bounds:
                block["schedule_fair_bound"] = bounds
