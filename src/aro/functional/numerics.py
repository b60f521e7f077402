r"""Numerics shared by every layer: scale guards, RMS matching, the parameter update, NaN screening.

Each function is one small, exact-where-possible operation that more than one place needs; they
live here so that ARO's path and the AdamW path (and the projections) do them the same way.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["amax_abs", "apply_update_", "finite_flags", "inverse_amax", "nesterov", "rms_match_", "rms_normalize",
           "unit_scale"]


def amax_abs(X: Tensor) -> Tensor:
    """Largest absolute entry of each matrix, ``(..., 1, 1)``, without a temporary.

    ``max(max X, -min X)``: two plain reductions, which need no ``|X|`` copy and on CPU beat
    ``vector_norm(ord=inf)`` and ``aminmax`` over two dimensions (benchmarks/step_ablations.py).
    """
    dims = (-2, -1)
    return torch.maximum(X.amax(dim=dims, keepdim=True), X.amin(dim=dims, keepdim=True).neg_())


def inverse_amax(X: Tensor) -> Tensor:
    r""":math:`1/\max_{ij}|X_{ij}|` per matrix, ``(..., 1, 1)``, floored so that it stays finite:
    for a subnormal (or zero) ``X`` it is :math:`1/\text{tiny}` and the scaled entries stay below 1.
    It is a reciprocal so that callers multiply (cheaper than dividing every entry)."""
    return amax_abs(X).clamp_min_(torch.finfo(X.dtype).tiny).reciprocal_()


def unit_scale(X: Tensor) -> Tensor:
    r"""Return :math:`X / \max_{ij}|X_{ij}|` per matrix (zero matrices stay zero).

    Dividing by the largest entry is exact in floating point up to one rounding and makes
    every later sum of squares safe from overflow and underflow.
    """
    amax = amax_abs(X)
    return X / torch.where(amax > 0, amax, torch.ones_like(amax))


def rms_normalize(X: Tensor) -> Tensor:
    r"""Return :math:`X/\mathrm{RMS}(X)` per matrix, :math:`\mathrm{RMS}(X)=\|X\|_F/\sqrt{mn}`.

    Zero matrices stay zero. ``X`` must already be unit-scaled or otherwise well scaled.
    """
    m, n = X.shape[-2], X.shape[-1]
    rms = torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True) / math.sqrt(m * n)
    return X / torch.where(rms > 0, rms, torch.ones_like(rms))


def rms_match_(U: Tensor, rho: float) -> Tensor:
    r""":math:`U \leftarrow \rho\,U/\mathrm{RMS}(U)` per matrix, in place (zero matrices stay zero)."""
    rms = torch.linalg.vector_norm(U, dim=(-2, -1), keepdim=True) / (U.shape[-2] * U.shape[-1]) ** 0.5
    return U.mul_(torch.where(rms > 0, rho / torch.where(rms > 0, rms, 1.0), 0.0))


def nesterov(grads: list[Tensor], momenta: list[Tensor], beta: float) -> list[Tensor]:
    r"""The Nesterov momentum :math:`\beta M_t + (1-\beta) G_t`, new tensors (``momenta`` already hold :math:`M_t`)."""
    return torch._foreach_lerp(grads, momenta, beta)


def apply_update_(params: list[Tensor], updates: list[Tensor], *, lr: float, weight_decay: float,
                  scale: float) -> None:
    r""":math:`W \leftarrow (1-\eta\lambda)\,W + s\,U`, in place; ``s`` is :math:`-\eta` for ARO and 1 for
    AdamW, whose updates already carry it. A low-precision parameter with wider updates is
    computed in the update's dtype and rounded once, at the end."""
    same = [i for i, p in enumerate(params) if p.dtype == updates[i].dtype]
    if same:
        ps = [params[i] for i in same]
        if weight_decay:
            torch._foreach_mul_(ps, 1.0 - lr * weight_decay)
        torch._foreach_add_(ps, [updates[i] for i in same], alpha=scale)
    for p, u in zip(params, updates):
        if p.dtype != u.dtype:
            p.copy_(p.to(u.dtype).mul_(1.0 - lr * weight_decay).add_(u, alpha=scale))


def finite_flags(tensors: list[Tensor]) -> Tensor:
    """Bool vector: which tensors hold no NaN/Inf (on the first tensor's device).

    One multi-tensor 2-norm pass: NaN and Inf make the norm non-finite. A norm can also
    overflow for a large but finite tensor (1e30 is a legal float32 gradient), so those few are
    checked again exactly, by their min and max.
    """
    device = tensors[0].device
    idx = [i for i, t in enumerate(tensors) if t.numel()]
    finite = torch.ones(len(tensors), dtype=torch.bool, device=device)
    if idx:
        norms = torch._foreach_norm([tensors[i] for i in idx])
        if any(n.device != device or n.dtype != norms[0].dtype for n in norms):
            norms = [n.float().to(device) for n in norms]
        finite[idx] = torch.isfinite(torch.stack(norms))
    if not bool(finite.all()):
        for i in (~finite).nonzero().flatten().tolist():
            finite[i] = bool(torch.isfinite(torch.stack(torch.aminmax(tensors[i]))).all())
    return finite
