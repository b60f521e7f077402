"""Independent runs at once (``aro bench --jobs N``): each run trains in its own process.

On a CPU, two single-threaded runs keep two cores busy, which is how the budget ladders ran
(README "Speedup against training budget"). The protocol hands over runs that do not depend on
each other (the sweep; one round of grid extensions; the seeds and budgets at the chosen lrs)
and gets their results back in the order given. A run's result does not depend on where it
ran: weights and batches are functions of the seed alone, and each worker uses the thread count
a single process would be given (``--threads``, else the cores divided by ``--jobs``).

Each run gets a fresh spawned process (never forked: a forked child inherits the parent's torch
thread pools) that writes the run folder as a single process would; the parent reads the
result back from ``result.json``. Finished runs are read back without a process. A worker that
fails, or dies (e.g. killed for memory), stops the others (they resume from their last
evaluation on the next invocation) and raises here, naming the run: a pool that waited for the
result of a dead worker would wait forever. Workers do not outlive ``aro bench``: SIGTERM exits
it through the pool's cleanup, and on Linux a worker asks the kernel for SIGTERM when its parent
dies (even by SIGKILL), so no orphan trains on holding its run folder's lock.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
from collections import deque
from multiprocessing.connection import wait
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


# An error message goes back through a pipe that the parent reads only once the worker has
# exited; a message larger than the pipe's buffer (64 KiB on Linux) would block the worker.
MAX_MESSAGE = 4000


def _die_with_parent() -> None:
    """Linux: the kernel sends this process SIGTERM when the parent dies, so a killed ``aro bench``
    leaves no orphaned run holding its folder's lock (elsewhere the parent's exit handler stops it)."""
    import ctypes

    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != multiprocessing.parent_process().pid:  # it died before the call
            sys.exit(1)


def _worker(cfg: BenchConfig, spec: RunSpec, run_dir: str, threads: int, errors) -> None:
    """One run in a worker process; an exception's type and message go back through ``errors``."""
    try:
        _die_with_parent()
        import torch

        from .data import load_corpus
        from .train import run_training

        torch.set_num_threads(threads)
        run_training(cfg, spec, load_corpus(cfg.data), Path(run_dir), progress=False)
    except BaseException as exc:
        errors.send((type(exc).__name__, isinstance(exc, ValueError), str(exc)[:MAX_MESSAGE]))
        raise
    finally:
        errors.close()


class RunPool:
    """Up to ``cfg.jobs`` runs at once; :meth:`train_all` trains a list of independent runs.

    Use as a context manager: leaving it (also by an error) stops the workers still running.
    """

    def __init__(self, cfg: BenchConfig, run_dir: Callable[[RunSpec], Path], say: Callable[[str], None] = print):
        self._cfg, self._run_dir, self._say = cfg, run_dir, say
        self._threads = threads_per_job(cfg)
        self._ctx = multiprocessing.get_context("spawn")
        self._running: dict = {}  # process -> (index, spec, the end of its error pipe)

    def __enter__(self) -> "RunPool":
        # SIGTERM (a scheduler stopping the job) exits through __exit__, which stops the workers
        self._sigterm = None
        if threading.current_thread() is threading.main_thread():
            self._sigterm = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
        return self

    def __exit__(self, *exc) -> None:
        for process in self._running:
            process.terminate()
        for process in self._running:
            process.join()
        self._running.clear()
        if self._sigterm is not None:
            signal.signal(signal.SIGTERM, self._sigterm)

    def train_all(self, specs: list[RunSpec]) -> list[dict]:
        """Train ``specs``, at most ``cfg.jobs`` at once, started in the given order; their
        results in that order."""
        folders = [self._run_dir(spec) for spec in specs]
        finished = {folder: finished_result(folder) for folder in folders}
        # one worker per folder: specs that name the same run (e.g. an optimizer listed twice)
        # would otherwise meet at the folder's lock
        todo = deque(i for i, folder in enumerate(folders) if finished[folder] is None and folders.index(folder) == i)
        total, done = len(todo), 0
        while todo or self._running:
            while todo and len(self._running) < self._cfg.jobs:
                self._start(todo.popleft(), specs)
            by_sentinel = {p.sentinel: p for p in self._running}
            for sentinel in wait(list(by_sentinel)):
                index, spec, r = self._collect(by_sentinel[sentinel])
                finished[folders[index]] = r
                done += 1
                self._say(f"[{done}/{total}] {spec.name}: "
                          + ("diverged" if r["diverged"] else f"final val loss {r['final_val_loss']:.4f}"))
        return [finished[folder] for folder in folders]  # type: ignore[misc]

    def _start(self, index: int, specs: list[RunSpec]) -> None:
        spec = specs[index]
        reader, writer = self._ctx.Pipe(duplex=False)
        process = self._ctx.Process(target=_worker, name=f"aro-run-{spec.name}", daemon=True,
                                    args=(self._cfg, spec, str(self._run_dir(spec)), self._threads, writer))
        process.start()
        writer.close()  # the child holds the only writing end: a dead child reads as end of file
        self._running[process] = (index, spec, reader)

    def _collect(self, process) -> tuple[int, RunSpec, dict]:
        """The index, spec and result of a worker that exited; an error if the run did not finish."""
        process.join()
        index, spec, reader = self._running.pop(process)
        try:
            error = reader.recv() if reader.poll() else None
        except EOFError:  # the child closed its end without sending: no exception
            error = None
        reader.close()
        if error is not None:
            name, is_value_error, message = error
            if is_value_error:  # bad input or a busy run folder: the CLI's one-line error
                raise ValueError(f"run {spec.name}: {message}")
            raise RuntimeError(f"run {spec.name} failed in its worker process: {name}: {message}")
        result = finished_result(self._run_dir(spec))
        if process.exitcode != 0 or result is None:
            raise RuntimeError(f"run {spec.name}: its worker process ended with exit code {process.exitcode} and no "
                               "result (a negative code is the signal that killed it, e.g. -9 when out of memory); "
                               "the other runs were stopped; the same command resumes every run")
        return index, spec, result
