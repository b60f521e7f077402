"""Before/after timings of the optimizer-step optimizations (issue: step cost).

    .venv/bin/python benchmarks/step_ablations.py --out benchmarks/results/step-ablations.json

Interleaved medians (aro.bench.stepbench.interleaved_medians) of one ARO-Sinkhorn step on the
hidden matrices of a bench model preset:

* ``batched``          -- the default: same-shape matrices stepped as one batched computation;
* ``per_matrix``       -- one ``aro.ARO`` per matrix (what the batching replaced);
* ``shifted_cholesky`` -- the batched step with shifted Cholesky QR instead of Householder;
* ``sinkhorn_bmm``     -- the batched step with Sinkhorn's matrix-vector products done by
  ``torch.matmul`` (batched GEMV) instead of multiply-and-sum.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from unittest import mock

import torch

import aro
from aro.bench.models import build_model
from aro.bench.protocol import environment_info
from aro.bench.stepbench import interleaved_medians
from aro.functional import projections


def _sinkhorn_bmm(X, *, num_iters=5, variant="simultaneous", eps=1e-8):
    """The Sinkhorn of aro.functional.projections with its products as batched GEMV."""
    X = projections.unit_scale(X)
    m, n = X.shape[-2], X.shape[-1]
    S = X * X
    row_keep, col_keep = projections._signal_masks(S, m, n)
    u, v = row_keep.to(X.dtype), col_keep.to(X.dtype)
    for _ in range(num_iters):
        u_new = torch.where(row_keep, n / (S @ v.unsqueeze(-1)).squeeze(-1).clamp_min(eps * eps), torch.zeros_like(u))
        if variant == "alternating":
            u = u_new
        v = torch.where(col_keep, m / (u.unsqueeze(-2) @ S).squeeze(-2).clamp_min(eps * eps), torch.zeros_like(v))
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
    ap.add_argument("--out", default="benchmarks/results/step-ablations.json")
    args = ap.parse_args()

    batched = aro.ARO(_matrices(args.preset, 1), lr=1e-3)
    per_matrix = [aro.ARO([p], lr=1e-3) for p in _matrices(args.preset, 1)]
    scqr = aro.ARO(_matrices(args.preset, 1), lr=1e-3, qr="shifted_cholesky")
    bmm = aro.ARO(_matrices(args.preset, 1), lr=1e-3)

    def bmm_step():
        with mock.patch.object(projections, "sinkhorn", _sinkhorn_bmm):
            bmm.step()

    steps = {"batched": batched.step, "per_matrix": lambda: [o.step() for o in per_matrix],
             "shifted_cholesky": scqr.step, "sinkhorn_bmm": bmm_step}
    medians = interleaved_medians(steps, warmup=5, repeats=args.repeats, budget_s=60.0)
    result = {"environment": environment_info(), "preset": args.preset,
              "optimizer_step_ms": {k: 1e3 * v for k, v in medians.items()},
              "ratio_vs_batched": {k: v / medians["batched"] for k, v in medians.items()}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    for k, v in medians.items():
        print(f"{k:<18} {1e3 * v:8.2f} ms   x{v / medians['batched']:.2f}")


if __name__ == "__main__":
    main()
