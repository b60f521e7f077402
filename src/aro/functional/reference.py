r"""ARO as the paper writes it (its §3), one matrix at a time: the readable reference of the fast path.

    M  = momentum                      (the optimizer keeps it; Nesterov or plain)
    R' = QR( M f(Rᵀ M)ᵀ )              the new rotation: Q factor of the cross-Gram
    U  = R' f(R'ᵀ M)                   the update, rotated back
    U  = ρ U / RMS(U)                  matched to AdamW's update RMS

:class:`aro.ARO` computes the same thing batched over buckets of matrices, with Sinkhorn and
row-norm folded into the products as diagonal scalings, the QR warm-started from the previous
rotation and every scale guarded (:mod:`aro.functional.rotation`); the tests hold the two equal
in float64. This module is for reading and testing, not for speed.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

__all__ = ["aro_update", "qr_q"]


def qr_q(A: Tensor) -> Tensor:
    """The Q factor of ``A``, with column signs chosen so that the diagonal of R is >= 0."""
    Q, R = torch.linalg.qr(A)
    return Q * torch.where(torch.diagonal(R) < 0, -1.0, 1.0).to(Q.dtype)


def aro_update(M: Tensor, R: Tensor, f: Callable[[Tensor], Tensor], rms_target: float = 0.2) -> tuple[Tensor, Tensor]:
    """One matrix ``M`` (m x n, rotated on the m side), its previous rotation ``R`` (m x m) and a
    base projection ``f``: returns the RMS-matched update and the new rotation."""
    R_new = qr_q(M @ f(R.T @ M).T)
    U = R_new @ f(R_new.T @ M)
    return rms_target * U / U.square().mean().sqrt(), R_new
