"""The controlled protocol: lr sweep, seeds at the chosen lr, overtraining budgets, summary.

1. **Sweep** -- every optimizer runs every lr of its grid at seed 0 (grids have the same number of
   points for every optimizer, so baselines are tuned as hard as ARO). Runs are interleaved
   (lr by lr, optimizer by optimizer) so slow drifts of the machine hit all optimizers alike.
2. **Choice** -- each optimizer's lr is the one with the best final validation loss at seed 0.
3. **Seeds** -- seeds 1 .. n-1 at the chosen lr. Seed s fixes both the initial weights and the
   data order, identical for every optimizer.
4. **Overtraining** -- optional budgets k x S at the chosen lr, all seeds; or budgets in the
   paper's unit (``--budgets``, :mod:`aro.bench.ladder`): lrs swept at budget 1 and reused.

Everything in ``summary.json`` is computed from the run logs by :func:`summarize`, which is
also what ``aro report`` calls.
"""

from __future__ import annotations

import json
import math
import platform
import statistics
import subprocess
from pathlib import Path
from typing import Any

import torch

from .config import BenchConfig
from .data import load_corpus
from .metrics import mean_std, speedup
from .ladder import add_budget_blocks, ladder_runs
from .optimizers import BASELINES, check_mode
from .parallel import Parallel
from .stats import paired_difference, paired_ratio
from .train import RunSpec, atomic_write_text, run_training

__all__ = ["BASELINES", "environment_info", "run_benchmark", "summarize"]



def _git_sha() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _cpu_info() -> dict[str, Any]:
    """Name, family/model and the instruction sets that decide bfloat16 matmul speed, from the
    first processor of ``/proc/cpuinfo`` (Linux; elsewhere the name from ``platform``)."""
    info: dict[str, Any] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip()
            if key == "model name":
                info["name"] = value
            elif key in ("cpu family", "model"):
                info[key.replace(" ", "_")] = value
            elif key == "flags":
                flags = set(value.split())
                info["bf16_instructions"] = sorted(flags & {"avx512_bf16", "amx_bf16", "avx_ne_convert"})
                info["avx512"] = "avx512f" in flags
            elif not line.strip() and info:
                break  # the end of the first processor's block
    except OSError:
        pass
    info.setdefault("name", platform.processor() or platform.machine())
    return info


def environment_info() -> dict[str, Any]:
    cpu = _cpu_info()
    return {
        "git_sha": _git_sha(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu.pop("name"),
        "cpu_details": cpu,
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }


def run_dir(out: Path, spec: RunSpec) -> Path:
    return out / "runs" / spec.name


# Fields that may grow between invocations on one run folder: more optimizers (and their
# grids) join the same protocol, reusing the finished runs of the others.
_EXTENDABLE = ("optimizers", "lr_grid_by_optimizer", "lr_by_optimizer")
# Fields that change how runs execute, not what they compute: two processes of one thread each
# may resume a folder that was started with the default thread count.
_EXECUTION = ("out", "threads")


def _write_config(cfg: BenchConfig, corpus_info: dict, par: Parallel = Parallel()) -> dict:
    """Write config.json; a folder made by an earlier invocation must use the same protocol.

    Returns the folder's config (the union of all optimizers run in it).
    """
    out = cfg.out_dir
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.json"
    config = json.loads(json.dumps(cfg.to_dict()))
    if path.exists():
        previous = json.loads(path.read_text())["config"]
        fixed = [k for k in config if k not in _EXTENDABLE + _EXECUTION and previous.get(k) != config[k]]
        clashes = [f"{k}[{name}]" for k in _EXTENDABLE[1:] for name, v in config[k].items()
                   if name in previous.get(k, {}) and previous[k][name] != v]
        if fixed or clashes:
            raise ValueError(f"{out} holds a run with a different config ({', '.join(fixed + clashes)}); "
                             "resume it with the same flags or use another --out")
        config["optimizers"] = previous["optimizers"] + [o for o in config["optimizers"] if o not in previous["optimizers"]]
        for k in _EXTENDABLE[1:]:
            config[k] = {**previous.get(k, {}), **config[k]}
    env = {**environment_info(), "parallel": par.mode, "world_size": par.world}
    atomic_write_text(path, json.dumps({"config": config, "corpus": corpus_info, "environment": env}, indent=1))
    return config


def run_benchmark(cfg: BenchConfig, progress: bool = True, par: Parallel = Parallel()) -> dict:
    """Run (or resume) the whole protocol and write ``summary.json``/``summary.csv``/figures.

    Under data parallelism every rank calls this (see :mod:`aro.bench.parallel`).
    """
    from .report import write_report

    for name in cfg.optimizers:  # before anything is trained
        check_mode(name, par.mode)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    corpus = load_corpus(cfg.data)
    if par.is_main:
        _write_config(cfg, corpus.describe(), par)
    par.barrier()
    out = cfg.out_dir

    def run(spec: RunSpec) -> dict:
        return run_training(cfg, spec, corpus, run_dir(out, spec), progress=progress, par=par)

    grids = {name: cfg.lr_candidates(name) for name in cfg.optimizers}
    results: dict[str, dict[float, dict]] = {name: {} for name in cfg.optimizers}
    for i in range(max(len(g) for g in grids.values())):
        for name in cfg.optimizers:
            if i < len(grids[name]):
                lr = grids[name][i]
                results[name][lr] = run(RunSpec(name, lr, 0, cfg.steps))
    for name in cfg.optimizers:
        if len(grids[name]) > 1:
            _bracket_optimum(results[name], lambda lr, name=name: run(RunSpec(name, lr, 0, cfg.steps)))
    chosen = {name: _choose_lr(results[name]) for name in cfg.optimizers}
    for k in sorted(cfg.overtrain):
        for seed in range(cfg.seeds):
            for name in cfg.optimizers:
                if k == 1 and seed == 0:
                    continue
                run(RunSpec(name, chosen[name], seed, k * cfg.steps))
    for spec in ladder_runs(cfg, chosen):
        run(spec)
    par.barrier()
    summary = summarize(out, write=par.is_main)
    if par.is_main:
        write_report(out, summary)
    return summary


# A sweep whose best lr lies on an edge of its grid is extended by factors of 2 beyond that
# edge, at most this many points, so each optimizer's optimum is bracketed: the same rule for
# every optimizer, so no method is left under-tuned by a grid chosen for another.
MAX_GRID_EXTENSIONS = 2


def _bracket_optimum(by_lr: dict[float, dict], run_at) -> None:
    for _ in range(MAX_GRID_EXTENSIONS):
        grid = sorted(by_lr)
        best = _choose_lr(by_lr)
        if best == grid[-1]:
            lr = _round_lr(grid[-1] * 2)
        elif best == grid[0]:
            lr = _round_lr(grid[0] / 2)
        else:
            return
        by_lr[lr] = run_at(lr)


def _round_lr(lr: float) -> float:
    """``lr`` to 6 significant digits: 4e-3 * 2 is 0.008, not 0.008000000000000002."""
    return float(f"{lr:.6g}")


def _choose_lr(by_lr: dict[float, dict]) -> float:
    def key(item):
        lr, result = item
        loss = result["final_val_loss"]
        return (math.inf if loss is None else loss, lr)

    return min(by_lr.items(), key=key)[0]


# ---------------------------------------------------------------- summary from logs
def _load_runs(out: Path) -> list[dict]:
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
    runs = _load_runs(out)
    base_steps = cfg["steps"]
    names = [n for n in cfg["optimizers"] if any(r["spec"]["optimizer"] == n for r in runs)]

    def find(name, lr=None, seed=None, steps=None):
        return [r for r in runs if r["spec"]["optimizer"] == name
                and (lr is None or r["spec"]["lr"] == lr)
                and (seed is None or r["spec"]["seed"] == seed)
                and (steps is None or r["spec"]["steps"] == steps)]

    chosen = {}
    sweeps = {}
    for name in names:
        sweep = {r["spec"]["lr"]: r for r in find(name, seed=0, steps=base_steps)}
        if not sweep:
            continue
        sweeps[name] = {str(lr): sweep[lr]["final_val_loss"] for lr in sorted(sweep)}
        chosen[name] = _choose_lr(sweep)
    budgets = sorted({r["spec"]["steps"] for r in runs})
    summary: dict[str, Any] = {"optimizers": {}, "budgets": budgets, "base_steps": base_steps, "seeds": cfg["seeds"]}
    for name in chosen:
        grid = sorted(float(x) for x in sweeps[name])
        lr = chosen[name]
        entry: dict[str, Any] = {
            "lr": lr,
            "lr_sweep": sweeps[name],
            "lr_at_grid_edge": len(grid) > 1 and lr in (grid[0], grid[-1]),
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
