"""The summary of a run folder, computed from its run logs only (``summary.json``, ``summary.csv``).

Per optimizer: the lr sweep and the chosen lr (best final validation loss at seed 0), and per
budget the final loss over seeds, the crossing speedups and paired intervals against the
baselines, step times; with a budget ladder, the blocks of :mod:`aro.bench.ladder`.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from .files import atomic_write_text
from .ladder import add_budget_blocks
from .metrics import mean_std, speedup
from .optimizers import BASELINES
from .stats import paired_difference, paired_ratio

__all__ = ["choose_lr", "load_runs", "summarize"]


def choose_lr(by_lr: dict[float, dict]) -> float:
    def key(item):
        lr, result = item
        loss = result["final_val_loss"]
        return (math.inf if loss is None else loss, lr)

    return min(by_lr.items(), key=key)[0]


def load_runs(out: Path) -> list[dict]:
    runs = []
    for d in sorted((out / "runs").glob("*")):
        result_path = d / "result.json"
        if not result_path.exists():
            continue
        result = json.loads(result_path.read_text())
        lines = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines() if x.strip()]
        result["curve"] = {"step": [x["step"] for x in lines], "val_loss": [x["val_loss"] for x in lines]}
        runs.append(result)
    return runs


def summarize(out: Path, write: bool = True) -> dict:
    """Per-optimizer summary of the finished runs in ``out`` (and, if ``write``, summary.json/.csv)."""
    out = Path(out)
    cfg = json.loads((out / "config.json").read_text())["config"]
    runs = load_runs(out)
    base_steps = cfg["steps"]
    names = [n for n in cfg["optimizers"] if any(r["spec"]["optimizer"] == n for r in runs)]

    def find(name, lr=None, seed=None, steps=None):
        return [r for r in runs if r["spec"]["optimizer"] == name
                and (lr is None or r["spec"]["lr"] == lr)
                and (seed is None or r["spec"]["seed"] == seed)
                and (steps is None or r["spec"]["steps"] == steps)]

    chosen = {}
    sweeps = {}
    given_lr = set()  # optimizers whose lr was given, not chosen from a sweep
    for name in names:
        sweep = {r["spec"]["lr"]: r for r in find(name, seed=0, steps=base_steps)}
        # an lr given without a sweep stays the chosen one; other lrs at seed 0 are its lr check
        given = cfg.get("lr") if cfg.get("lr") is not None else (cfg.get("lr_by_optimizer") or {}).get(name)
        if not sweep or (given is not None and given not in sweep):
            continue
        sweeps[name] = {str(lr): sweep[lr]["final_val_loss"] for lr in sorted(sweep)}
        chosen[name] = given if given is not None else choose_lr(sweep)
        if given is not None:
            given_lr.add(name)
    budgets = sorted({r["spec"]["steps"] for r in runs})
    summary: dict[str, Any] = {"optimizers": {}, "budgets": budgets, "base_steps": base_steps, "seeds": cfg["seeds"]}
    for name in chosen:
        grid = sorted(float(x) for x in sweeps[name])
        lr = chosen[name]
        entry: dict[str, Any] = {
            "lr": lr,
            "lr_sweep": sweeps[name],
            # a given lr was not chosen from a grid: its lr check says whether it transfers
            "lr_at_grid_edge": name not in given_lr and len(grid) > 1 and lr in (grid[0], grid[-1]),
        }
        for steps in budgets:
            block = _budget_block(name, lr, steps, chosen, find)
            if block is None:
                continue
            if steps == base_steps:
                entry.update(block)
            elif not cfg.get("budgets"):
                entry.setdefault("overtrain", {})[str(steps // base_steps)] = block
        summary["optimizers"][name] = entry
    add_budget_blocks(summary, cfg, chosen, find, _budget_block)
    if write:
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
        atomic_write_text(out / "summary.csv", _csv(summary))
    return summary


def _budget_block(name, lr, steps, chosen, find) -> dict | None:
    mine = {r["spec"]["seed"]: r for r in find(name, lr=lr, steps=steps)}
    if not mine:
        return None
    seeds = sorted(mine)
    block: dict[str, Any] = {
        "seeds": seeds,
        "final_val_loss": mean_std([mine[s]["final_val_loss"] for s in seeds]),
        "step_time_s": _median([mine[s]["step_time_s"] for s in seeds]),
        "optimizer_step_time_s": _median([mine[s]["optimizer_step_time_s"] for s in seeds]),
        "diverged": [s for s in seeds if mine[s]["diverged"]],
        "optimizer_stats": mine[seeds[0]]["optimizer_stats"],
        "speedup": {},
        "final_loss_diff": {},
        "paired": {},
        "step_time_ratio": {},
    }
    starved = [mine[s].get("starved_experts") for s in seeds]
    if any(v is not None for v in starved):  # an MoE model; None for a run logged before the count existed
        block["starved_experts"] = starved
    for base in BASELINES:
        if base not in chosen:
            continue
        theirs = {r["spec"]["seed"]: r for r in find(base, lr=chosen[base], steps=steps)}
        common = [s for s in seeds if s in theirs]
        if not common:
            continue
        ups = [speedup(mine[s]["curve"]["step"], mine[s]["curve"]["val_loss"], theirs[s]["curve"]["step"],
                       theirs[s]["curve"]["val_loss"], steps) for s in common]
        diffs = [None if mine[s]["final_val_loss"] is None or theirs[s]["final_val_loss"] is None
                 else mine[s]["final_val_loss"] - theirs[s]["final_val_loss"] for s in common]
        block["speedup"][base] = mean_std(ups)
        block["final_loss_diff"][base] = mean_std(diffs)
        block["paired"][base] = {
            "final_loss_diff": paired_difference([mine[s]["final_val_loss"] for s in common],
                                                 [theirs[s]["final_val_loss"] for s in common]),
            "speedup": paired_ratio(ups),
        }
        their_time = _median([theirs[s]["step_time_s"] for s in common])
        if their_time and block["step_time_s"]:
            block["step_time_ratio"][base] = block["step_time_s"] / their_time
    return block


def _median(values: list) -> float | None:
    finite = [v for v in values if v is not None]
    return statistics.median(finite) if finite else None


def _csv(summary: dict) -> str:
    cols = ["optimizer", "budget", "lr", "final_val_loss_mean", "final_val_loss_std", "speedup_vs_adamw_mean",
            "speedup_vs_adamw_std", "speedup_vs_muon_mean", "speedup_vs_muon_std", "step_time_s",
            "optimizer_step_time_s", "n_seeds"]
    rows = [",".join(cols)]
    for name, e in summary["optimizers"].items():
        if len(e.get("budgets") or {}) > 1:  # a ladder in the paper's unit
            blocks = sorted(e["budgets"].items(), key=lambda kv: kv[1]["budget"])
        else:
            blocks = [("1", e)] + sorted((e.get("overtrain") or {}).items(), key=lambda kv: int(kv[0]))
        for budget, b in blocks:
            if "final_val_loss" not in b:
                continue
            vals = [name, budget, e["lr"], b["final_val_loss"]["mean"], b["final_val_loss"]["std"]]
            for base in BASELINES:
                s = b["speedup"].get(base, {})
                vals += [s.get("mean"), s.get("std")]
            vals += [b["step_time_s"], b["optimizer_step_time_s"], len(b["seeds"])]
            rows.append(",".join("" if v is None else (f"{v:.6g}" if isinstance(v, float) else str(v)) for v in vals))
    return "\n".join(rows) + "\n"
