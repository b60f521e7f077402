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
* ``every4``             -- a new rotation every 4th step (``rotation_every=4``);
* ``compiled``           -- (``--compile``) the pure rotated step under ``torch.compile``.
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
from aro.bench.protocol import environment_info
from aro.bench.timing import time_interleaved, warm_allocator
from aro.functional import projections
from aro.functional.projections import sinkhorn


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
    }
    per_matrix = [aro.ARO([p], lr=1e-3) for p in _matrices(args.preset, 1)]
    steps = {k: o.step for k, o in opts.items()}
    steps["per_matrix"] = lambda: [o.step() for o in per_matrix]
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
    base = timings["default"]["ms"]
    result = {"environment": environment_info(), "preset": args.preset, "compile_seconds": compile_s,
              "optimizer_step_ms": {k: t["ms"] for k, t in timings.items()},
              "ratio_vs_default": {k: t["ms"] / base for k, t in timings.items()},
              "faults_per_step": {k: t["faults"] for k, t in timings.items()}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    for k, t in timings.items():
        print(f"{k:<18} {t['ms']:8.2f} ms   x{t['ms'] / base:.2f}")
    if compile_s is not None:
        print(f"(torch.compile: first step {compile_s:.0f} s)")


if __name__ == "__main__":
    main()
