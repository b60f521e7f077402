"""``qr="auto"`` and ``matmul_dtype="auto"``: the QR and the precision of the products, chosen by
measurement the first time a bucket shape is seen.

Which is faster depends on the machine more than on the algorithm: a batched Householder QR
against a shifted Cholesky QR (three Cholesky factorizations and triangular solves, but mostly
matrix products), float32 products against bfloat16 ones (several times faster where bfloat16 is
native -- AVX512-BF16, AMX, tensor cores -- and many times slower where it is emulated). So
the first step of each bucket shape times the candidate combinations on the step's own inputs
(one warm-up call each, then interleaved rounds, medians) and every later step of that shape uses
the fastest. The choice is cached for the process, reported by :func:`choices` (and
``ARO.stats()["auto_choices"]``), and a result depends only on the choice: pin ``qr`` and
``matmul_dtype`` to make runs on different machines compute the same thing.

bfloat16 products are a candidate only under ``matmul_dtype="auto"`` and only where bfloat16 is
native (:func:`native_bf16`): they change the numerics beyond rounding (an 8-bit mantissa), which
is the user's call; the two QRs agree to rounding.
"""

from __future__ import annotations

import functools
import statistics
import time
from typing import Callable, Hashable

import torch

__all__ = ["ROUNDS", "choices", "choose", "native_bf16", "options"]

ROUNDS = 3  # timed rounds per candidate after one warm-up call; the median decides

Choice = tuple[str, "torch.dtype | None"]
_CHOSEN: dict[Hashable, Choice] = {}


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 natively (CUDA: compute capability 8 or more; CPU:
    the AVX512-BF16 or AMX-BF16 instructions, read from ``/proc/cpuinfo``)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})
    return False


def options(qr: str, matmul_dtype: "torch.dtype | str | None", device: torch.device,
            dtype: torch.dtype = torch.float32) -> list[Choice]:
    """The (qr, matmul dtype) combinations to time for a group's settings (one if both are
    pinned). bfloat16 products are offered for float32 state only: float64 state asks for
    float64 accuracy."""
    qrs = ["householder", "shifted_cholesky"] if qr == "auto" else [qr]
    if matmul_dtype == "auto":
        dtypes = [None, torch.bfloat16] if native_bf16(device) and dtype == torch.float32 else [None]
    else:
        dtypes = [matmul_dtype]
    return [(q, d) for q in qrs for d in dtypes]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def choose(key: Hashable, candidates: list[Choice], run: Callable[[str, "torch.dtype | None"], object],
           device: torch.device) -> Choice:
    """The fastest of ``candidates`` for ``key``, timing ``run(qr, matmul_dtype)`` the first time."""
    if key in _CHOSEN:
        return _CHOSEN[key]
    if len(candidates) == 1:
        _CHOSEN[key] = candidates[0]
        return candidates[0]
    times: dict[Choice, list[float]] = {c: [] for c in candidates}
    for c in candidates:
        run(*c)  # warm-up: allocations, library initialization
    for _ in range(ROUNDS):
        for c in candidates:  # interleaved, so a slow moment of the machine hits every candidate
            _sync(device)
            t0 = time.perf_counter()
            run(*c)
            _sync(device)
            times[c].append(time.perf_counter() - t0)
    best = min(candidates, key=lambda c: statistics.median(times[c]))
    _CHOSEN[key] = best
    return best


def choices() -> dict[str, str]:
    """Every choice made in this process: ``{bucket description: "qr, matmul dtype"}``."""
    out = {}
    for key, (qr, dtype) in _CHOSEN.items():
        out[str(key)] = f"{qr}, {'float32' if dtype is None else str(dtype).replace('torch.', '')} products"
    return out
