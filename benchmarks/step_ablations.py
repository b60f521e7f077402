"""Before/after timings of the optimizer-step optimizations (issue: step cost), in one run.

    .venv/bin/python benchmarks/step_ablations.py --out benchmarks/results/step-ablations.json
    .venv/bin/python benchmarks/step_ablations.py --compile      # + torch.compile (about 30 s to compile)

Interleaved medians (:func:`aro.bench.timing.time_interleaved`, allocator warmed as in training)
of one ARO-Sinkhorn step on the hidden matrices of a bench model preset; every variant below
differs from ``default`` in one thing:

* ``default``            -- what ``aro.ARO`` does: same-shape matrices batched, Householder QR,
  Sinkhorn as a diagonal scaling folded into the products;
* ``per_matrix``         -- one ``aro.ARO`` per matrix (no batching);
* ``shifted_cholesky``   -- shifted Cholesky QR instead of Householder;
* ``materialized_f``     -- Sinkhorn passed as a plain callable, so the step writes f(Z) out and
  multiplies by it (the path every user callable takes) instead of folding (a, b) into the products;
* ``previous_sinkhorn``  -- as ``materialized_f``, with the Sinkhorn this project shipped before
  (matrix-vector products as multiply-and-sum, ``|X|`` copies for the largest entry);
* ``every4``             -- a new rotation every 4th step (``rotation_every=4``), timed over
  four steps per call (its amortized cost);
* ``bf16_products``      -- the products by R in bfloat16 (``matmul_dtype=torch.bfloat16``);
* ``qr_one_thread``      -- the Householder QR on one intra-op thread (the thread count set
  around each factorization and restored after it), everything else on the process's threads;
* ``compiled``           -- (``--compile``) the pure rotated step under ``torch.compile``.

A second table (``pieces``) splits the default step: for every bucket of same-shape matrices
of the preset it times, interleaved, the four matrix products, the two Sinkhorn scalings, the
orthonormalization (QR) and the whole rotated step, and sums them over the buckets; what is
left of the optimizer step is the elementwise work around them (momentum, RMS matching,
the parameter update, the AdamW path) and Python.

A third table (``qr_threads``) times the batched Householder QR of square matrices alone on
the process's intra-op threads and on one thread, for batches of the sizes a model's buckets have.
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path
from unittest import mock

import torch

import aro
from aro import engine
from aro.bench.models import build_model
from aro.bench.environment import environment_info
from aro.bench.timing import time_interleaved, warm_allocator
from aro.functional import projections
from aro.functional import qr as qr_module
from aro.functional.projections import sinkhorn
from aro.functional.qr import householder_qr


def _previous_sinkhorn(X, *, num_iters=5, eps=1e-8):
    """The simultaneous Sinkhorn as shipped before this change (kept only to time against)."""
    amax = X.abs().amax(dim=(-2, -1), keepdim=True)
    X = X / torch.where(amax > 0, amax, torch.ones_like(amax))
    m, n = X.shape[-2], X.shape[-1]
    S = X * X
    row_keep, col_keep = projections._signal_masks(S, m, n)
    u, v = row_keep.to(X.dtype), col_keep.to(X.dtype)
    for _ in range(num_iters):
        u_new = torch.where(row_keep, n / (S * v.unsqueeze(-2)).sum(dim=-1).clamp_min(eps * eps), torch.zeros_like(u))
        v = torch.where(col_keep, m / (S * u.unsqueeze(-1)).sum(dim=-2).clamp_min(eps * eps), torch.zeros_like(v))
        u = u_new
    return projections.rms_normalize(u.sqrt().unsqueeze(-1) * X * v.sqrt().unsqueeze(-2))


def _matrices(preset: str, seed: int) -> list[torch.nn.Parameter]:
    model = build_model(preset, seed=0)
    mats = [p for _, (p, role) in aro.classify_parameters(model).items() if role == "matrix"]
    g = torch.Generator().manual_seed(seed)
    for p in mats:
        p.grad = torch.randn(p.shape, generator=g) * 1e-2
    return mats


def pieces(preset: str, repeats: int) -> dict[str, float]:
    """Milliseconds of the parts of the default rotated step, summed over the preset's buckets."""
    from aro.functional.projections import make_projection
    from aro.functional.qr import orthonormalize
    from aro.functional.rotation import _common_scale, cross_gram, shared_rotated_step

    f = make_projection("sinkhorn")
    shapes: dict[tuple[int, int], int] = {}
    for p in _matrices(preset, 1):
        m, n = sorted(p.shape)
        shapes[(m, n)] = shapes.get((m, n), 0) + 1
    total: dict[str, float] = {}
    g = torch.Generator().manual_seed(0)
    for (m, n), count in shapes.items():
        M = torch.randn(count, m, n, generator=g) * 1e-2
        R = torch.linalg.qr(torch.randn(count, m, m, generator=g))[0]
        Ms = _common_scale([M])[0]
        Z = R.mT @ Ms
        A = cross_gram([M], R, policy="aro", f=f)
        cases = {
            "products (4)": lambda: [torch.bmm(R.mT, Ms) for _ in range(4)],
            "sinkhorn scalings (2)": lambda: [f.of_bounded(Z) for _ in range(2)],
            "orthonormalize (QR)": lambda: orthonormalize(A, R),
            "rotated step": lambda: shared_rotated_step([M], R, policy="aro", f=f),
        }
        for k, t in time_interleaved(cases, warmup=3, repeats=repeats, budget_s=30.0).items():
            total[k] = total.get(k, 0.0) + t["ms"]
    return total


def _householder_qr_one_thread(A):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return householder_qr(A)
    finally:
        torch.set_num_threads(before)


def qr_threads(repeats: int) -> dict[str, dict[str, float]]:
    """Milliseconds of a batched Householder QR on the process's threads and on one thread."""
    out = {}
    g = torch.Generator().manual_seed(0)
    for batch, d in [(16, 128), (8, 128), (4, 256), (2, 512), (1, 1024)]:
        A = torch.randn(batch, d, d, generator=g)

        cases = {f"{torch.get_num_threads()} threads": lambda A=A: householder_qr(A),
                 "1 thread": lambda A=A: _householder_qr_one_thread(A)}
        out[f"{batch} x {d}x{d}"] = {k: t["ms"] for k, t in time_interleaved(cases, warmup=3, repeats=repeats,
                                                                             budget_s=20.0).items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--compile", action="store_true", help="also time the rotated step under torch.compile")
    ap.add_argument("--out", default="benchmarks/results/step-ablations.json")
    args = ap.parse_args()

    warm_allocator()
    opts = {
        "default": aro.ARO(_matrices(args.preset, 1), lr=1e-3),
        "shifted_cholesky": aro.ARO(_matrices(args.preset, 1), lr=1e-3, qr="shifted_cholesky"),
        "materialized_f": aro.ARO(_matrices(args.preset, 1), lr=1e-3, base=partial(sinkhorn, num_iters=5)),
        "previous_sinkhorn": aro.ARO(_matrices(args.preset, 1), lr=1e-3, base=_previous_sinkhorn),
        "every4": aro.ARO(_matrices(args.preset, 1), lr=1e-3, rotation_every=4),
        "bf16_products": aro.ARO(_matrices(args.preset, 1), lr=1e-3, matmul_dtype=torch.bfloat16),
        "qr_one_thread": aro.ARO(_matrices(args.preset, 1), lr=1e-3),
    }
    per_matrix = [aro.ARO([p], lr=1e-3) for p in _matrices(args.preset, 1)]
    steps = {k: o.step for k, o in opts.items()}
    steps["every4"] = lambda: [opts["every4"].step() for _ in range(4)]
    steps["per_matrix"] = lambda: [o.step() for o in per_matrix]

    def qr_one_thread_step():
        with mock.patch.object(qr_module, "householder_qr", _householder_qr_one_thread):
            opts["qr_one_thread"].step()

    steps["qr_one_thread"] = qr_one_thread_step
    compile_s = None
    if args.compile:
        compiled_opt = aro.ARO(_matrices(args.preset, 1), lr=1e-3)
        compiled = torch.compile(engine.shared_rotated_step, dynamic=False)

        def compiled_step():
            with mock.patch.object(engine, "shared_rotated_step", compiled):
                compiled_opt.step()

        t0 = time.perf_counter()
        compiled_step()
        compile_s = time.perf_counter() - t0
        steps["compiled"] = compiled_step
    timings = time_interleaved(steps, warmup=5, repeats=args.repeats, budget_s=120.0)
    timings["every4"]["ms"] /= 4
    base = timings["default"]["ms"]
    result = {"environment": environment_info(), "preset": args.preset, "compile_seconds": compile_s,
              "optimizer_step_ms": {k: t["ms"] for k, t in timings.items()},
              "ratio_vs_default": {k: t["ms"] / base for k, t in timings.items()},
              "faults_per_step": {k: t["faults"] for k, t in timings.items()},
              "pieces": pieces(args.preset, args.repeats), "qr_threads": qr_threads(args.repeats)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    for k, t in timings.items():
        print(f"{k:<18} {t['ms']:8.2f} ms   x{t['ms'] / base:.2f}")
    if compile_s is not None:
        print(f"(torch.compile: first step {compile_s:.0f} s)")
    print("pieces of the default step, summed over buckets:", {k: round(v, 2) for k, v in result["pieces"].items()})
    print("batched Householder QR (ms):", {k: {c: round(v, 2) for c, v in r.items()} for k, r in result["qr_threads"].items()})


if __name__ == "__main__":
    main()
