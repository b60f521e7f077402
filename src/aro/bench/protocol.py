"""The controlled protocol: lr sweep, seeds at the chosen lr, overtraining budgets, summary.

1. **Sweep** -- every optimizer runs every lr of its grid at seed 0 (grids have the same number of
   points for every optimizer, so baselines are tuned as hard as ARO). Runs are interleaved
   (lr by lr, optimizer by optimizer) so slow drifts of the machine hit all optimizers alike.
2. **Choice** -- each optimizer's lr is the one with the best final validation loss at seed 0.
3. **Seeds** -- seeds 1 .. n-1 at the chosen lr. Seed s fixes both the initial weights and the
   data order, identical for every optimizer.
4. **Overtraining** -- optional budgets k x S at the chosen lr, all seeds; or budgets in the
   paper's unit (``--budgets``, :mod:`aro.bench.ladder`): lrs swept at budget 1 and reused.

Everything in ``summary.json`` is computed from the run logs by
:func:`aro.bench.summary.summarize`, which is also what ``aro report`` calls.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import torch

from .config import BenchConfig
from .data import load_corpus
from .environment import environment_info
from .files import atomic_write_text
from .jobs import RunPool, threads_per_job
from .ladder import ladder_runs, round_lr
from .optimizers import check_mode
from .parallel import Parallel
from .report import write_report
from .summary import choose_lr, summarize
from .train import RunSpec, run_training

__all__ = ["run_benchmark"]


def run_dir(out: Path, spec: RunSpec) -> Path:
    return out / "runs" / spec.name


# Fields that may grow between invocations on one run folder: more optimizers (and their
# grids) join the same protocol, reusing the finished runs of the others.
_EXTENDABLE = ("optimizers", "lr_grid_by_optimizer", "lr_by_optimizer")
# Fields that change how runs execute, not what they compute: two processes of one thread each
# may resume a folder that was started with the default thread count.
_EXECUTION = ("out", "threads", "jobs")


def _write_config(cfg: BenchConfig, corpus_info: dict, par: Parallel = Parallel()) -> dict:
    """Write config.json; a folder made by an earlier invocation must use the same protocol.

    Returns the folder's config (the union of all optimizers run in it).
    """
    out = cfg.out_dir
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.json"
    config = json.loads(json.dumps(cfg.to_dict()))
    if path.exists():
        # a field added after the folder was made counts as its default there
        defaults = json.loads(json.dumps(BenchConfig(**{"preset": cfg.preset}).to_dict()))
        previous = {**defaults, **json.loads(path.read_text())["config"]}
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
    if cfg.jobs > 1:  # this process only hands out runs: record the threads each run trains with
        env["threads"] = threads_per_job(cfg)
    atomic_write_text(path, json.dumps({"config": config, "corpus": corpus_info, "environment": env}, indent=1))
    return config


def run_benchmark(cfg: BenchConfig, progress: bool = True, par: Parallel = Parallel()) -> dict:
    """Run (or resume) the whole protocol and write ``summary.json``/``summary.csv``/figures.

    Under data parallelism every rank calls this (see :mod:`aro.bench.parallel`); with
    ``cfg.jobs`` > 1 independent runs train in worker processes (:mod:`aro.bench.jobs`).
    """
    for name in cfg.optimizers:  # before anything is trained
        check_mode(name, par.mode)
    if cfg.jobs > 1 and par.mode != "none":
        raise ValueError(f"--jobs {cfg.jobs} with --parallel {par.mode}: the data-parallel ranks already use the "
                         "processes; give one of them")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    corpus = load_corpus(cfg.data)
    if par.is_main:
        _write_config(cfg, corpus.describe(), par)
    par.barrier()
    out = cfg.out_dir
    with ExitStack() as stack:
        if cfg.jobs > 1:
            pool = stack.enter_context(RunPool(cfg, lambda spec: run_dir(out, spec)))
            train_all = pool.train_all
        else:
            def train_all(specs: list[RunSpec]) -> list[dict]:
                return [run_training(cfg, s, corpus, run_dir(out, s), progress=progress, par=par) for s in specs]
        grids = {name: cfg.lr_candidates(name) for name in cfg.optimizers}
        if all(len(grid) == 1 for grid in grids.values()):
            # no lr to choose: seed 0 goes to the workers with the other runs, since waiting for it
            # as for a sweep would leave all but one of --jobs idle (one optimizer, given lr)
            chosen = {name: grid[0] for name, grid in grids.items()}
            first = [RunSpec(name, chosen[name], 0, cfg.steps) for name in cfg.optimizers]
        else:
            chosen, first = _sweep(cfg, train_all), []
        later = [RunSpec(name, chosen[name], seed, k * cfg.steps) for k in sorted(cfg.overtrain)
                 for seed in range(cfg.seeds) for name in cfg.optimizers if not (k == 1 and seed == 0)]
        train_all(first + later + ladder_runs(cfg, chosen))
    par.barrier()
    summary = summarize(out, write=par.is_main)
    if par.is_main:
        write_report(out, summary)
    return summary


def _sweep(cfg: BenchConfig, train_all) -> dict[str, float]:
    """Steps 1-2: every optimizer's grid at seed 0 (interleaved lr by lr), its extensions, the
    chosen lrs."""
    grids = {name: cfg.lr_candidates(name) for name in cfg.optimizers}
    results: dict[str, dict[float, dict]] = {name: {} for name in cfg.optimizers}

    def train(specs: list[RunSpec]) -> None:
        for spec, result in zip(specs, train_all(specs)):
            results[spec.optimizer][spec.lr] = result

    train([RunSpec(name, grids[name][i], 0, cfg.steps) for i in range(max(map(len, grids.values())))
           for name in cfg.optimizers if i < len(grids[name])])
    for _ in range(MAX_GRID_EXTENSIONS):  # one round extends every optimizer whose best lr is on an edge
        extend = {name: _next_lr(results[name]) for name in cfg.optimizers if len(grids[name]) > 1}
        specs = [RunSpec(name, lr, 0, cfg.steps) for name, lr in extend.items() if lr is not None]
        if not specs:
            break
        train(specs)
    return {name: choose_lr(results[name]) for name in cfg.optimizers}


# A sweep whose best lr lies on an edge of its grid is extended by factors of 2 beyond that
# edge, at most this many points, so each optimizer's optimum is bracketed: the same rule for
# every optimizer, so no method is left under-tuned by a grid chosen for another.
MAX_GRID_EXTENSIONS = 2


def _next_lr(by_lr: dict[float, dict]) -> float | None:
    """The grid's next point beyond the edge its best lr lies on (x2 or /2); None when bracketed."""
    grid = sorted(by_lr)
    best = choose_lr(by_lr)
    if best == grid[-1]:
        return round_lr(grid[-1] * 2)
    if best == grid[0]:
        return round_lr(grid[0] / 2)
    return None
