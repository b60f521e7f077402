"""Independent runs at once (``aro bench --jobs N``): each run trains in its own process.

On a CPU one training process with one thread uses one core better than two threads do, so a
2-core machine trains two runs at once, one thread each (README "Speedup against training
budget"). The protocol hands over runs that do not depend on each other (the sweep; one round
of grid extensions; the seeds and budgets at the chosen lrs) and gets their results back in
the order given. A run's result does not depend on where it ran: weights and batches are
functions of the seed alone, and each worker uses the thread count a single process would be
given (``--threads``, else the cores divided by ``--jobs``).

Workers are spawned (never forked: a forked child inherits the parent's torch thread pools),
one fresh process per run; finished runs are read back without one. An error in any run stops
the others (they resume from their last evaluation on the next invocation) and is raised here.
"""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path
from typing import Callable

from .config import BenchConfig
from .train import RunSpec, finished_result

__all__ = ["RunPool", "threads_per_job"]


def threads_per_job(cfg: BenchConfig) -> int:
    """``--threads`` if given, else this process's cores divided by ``--jobs`` (at least 1)."""
    if cfg.threads:
        return cfg.threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // cfg.jobs)


def _train_in_worker(task: tuple[int, BenchConfig, RunSpec, str, int]) -> tuple[int, dict]:
    index, cfg, spec, run_dir, threads = task
    import torch

    from .data import load_corpus
    from .train import run_training

    torch.set_num_threads(threads)
    return index, run_training(cfg, spec, load_corpus(cfg.data), Path(run_dir), progress=False)


class RunPool:
    """``cfg.jobs`` worker processes; :meth:`train_all` trains a list of independent runs.

    Use as a context manager: leaving it stops the workers.
    """

    def __init__(self, cfg: BenchConfig, run_dir: Callable[[RunSpec], Path], say: Callable[[str], None] = print):
        self._cfg, self._run_dir, self._say = cfg, run_dir, say
        self._threads = threads_per_job(cfg)
        self._pool = multiprocessing.get_context("spawn").Pool(cfg.jobs, maxtasksperchild=1)

    def __enter__(self) -> "RunPool":
        return self

    def __exit__(self, *exc) -> None:
        self._pool.terminate()  # after train_all returned nothing is running; after an error, stop
        self._pool.join()

    def train_all(self, specs: list[RunSpec]) -> list[dict]:
        """Train ``specs`` (at most ``cfg.jobs`` at once, started in the given order); their
        results in that order."""
        results: list[dict | None] = [finished_result(self._run_dir(spec)) for spec in specs]
        tasks = [(i, self._cfg, spec, str(self._run_dir(spec)), self._threads)
                 for i, spec in enumerate(specs) if results[i] is None]
        for done, (i, result) in enumerate(self._pool.imap_unordered(_train_in_worker, tasks), 1):
            results[i] = result
            loss = "diverged" if result["diverged"] else f"final val loss {result['final_val_loss']:.4f}"
            self._say(f"[{done}/{len(tasks)}] {specs[i].name}: {loss}")
        return results  # type: ignore[return-value]
