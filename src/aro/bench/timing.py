"""Interleaved timing for the step-cost benchmarks (``aro stepbench``, ``benchmarks/step_ablations.py``).

Rules (docs/BENCHMARK.md): warm up first (a process's first iterations run about 2x slow here),
then call the things compared *in turn*, round after round, so that a change of machine speed
hits all of them alike, and report medians.

Two details matter on CPU:

* **Allocator state.** glibc's ``malloc`` serves large blocks with fresh ``mmap``'d pages, and
  trims freed memory back to the kernel, until a large block has been freed once; then it
  raises its thresholds and recycles memory. In a training loop the forward and backward pass
  free far larger blocks than an optimizer step allocates, so the step runs on recycled
  memory: inside ``aro stepbench``'s training-step timing no optimizer takes a page fault,
  while ARO-Sinkhorn stepped alone on the ``small`` preset in a fresh process takes about 2500
  per step (each zeroes a 4 KiB page in the kernel). :func:`warm_allocator` frees one 24 MiB
  block before any timing, after which the step takes almost none, as in training; the page
  faults per call are recorded, so this stays visible (``--cold-allocator`` skips it).
* **Very slow cases.** A case whose warm-up call exceeds ``slow_s`` is timed once more and, if
  that call is slow too (the first may carry one-time work, such as ``qr="auto"`` timing its
  options), taken out of the rounds (its figure is marked ``rounds: 1``), so that one pathological case
  (``torch.optim.Muon``'s bfloat16 Newton-Schulz on a CPU without bfloat16 instructions, tens
  of seconds per step on a 1024 x 4096 matrix) does not hold up the others.
"""

from __future__ import annotations

import resource
import statistics
import time
from typing import Callable

import torch

__all__ = ["Timing", "time_interleaved", "warm_allocator"]

# glibc raises its mmap threshold to the size of a freed mmap'd block only up to
# DEFAULT_MMAP_THRESHOLD_MAX (32 MiB on 64-bit), and its trim threshold to twice that: a 24 MiB
# block gets both as high as they go while staying below the cap (a 32 MiB tensor, with malloc's
# header, is just above it and changes nothing).
_WARM_BYTES = 24 * 2**20


def warm_allocator() -> None:
    """Allocate, touch and free one 24 MiB block (see the module docstring)."""
    block = torch.empty(_WARM_BYTES // 4, dtype=torch.float32)
    block.fill_(0.0)
    del block


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class Timing(dict):
    """Per case: ``ms`` (median), ``rounds`` (timed calls), ``faults`` (median minor page
    faults per call). A plain dict, so that it goes to JSON as it is."""


def time_interleaved(steps: dict[str, Callable[[], None]], *, warmup: int, repeats: int, budget_s: float,
                     slow_s: float = float("inf")) -> dict[str, Timing]:
    """Time each callable: ``warmup`` untimed rounds, then round-robin timed rounds (at least 3
    and at most ``repeats``; fewer once ``budget_s`` seconds have passed). A callable whose
    first warm-up call takes longer than ``slow_s`` is timed once more and, if that call is slow
    too, leaves the rounds."""
    slow: dict[str, list[tuple[float, int]]] = {}
    active = dict(steps)
    for r in range(warmup):
        for k, fn in list(active.items()):
            t0 = time.perf_counter()
            fn()
            if r == 0 and time.perf_counter() - t0 > slow_s:
                again = _timed(fn)  # a first call may carry one-time work (qr="auto" timing its options)
                if again[0] > slow_s:
                    slow[k] = [again]
                    del active[k]
    times: dict[str, list[tuple[float, int]]] = {k: [] for k in active}
    start = time.perf_counter()
    for r in range(repeats):
        for k, fn in active.items():
            times[k].append(_timed(fn))
        if r >= 2 and time.perf_counter() - start > budget_s:
            break
    times.update(slow)
    return {k: Timing(ms=1e3 * statistics.median(t for t, _ in v), rounds=len(v),
                      faults=statistics.median(f for _, f in v)) for k, v in times.items()}


def _timed(fn: Callable[[], None]) -> tuple[float, int]:
    f0 = _minor_faults()
    t0 = time.perf_counter()
    fn()
    t = time.perf_counter() - t0
    return t, _minor_faults() - f0
