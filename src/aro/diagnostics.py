r"""Measurements of what a rotation does (pure functions; the paper's Figure 2 analyses).

For a momentum :math:`M` (oriented, ``(..., m, n)``), a rotation :math:`R` and a base
projection :math:`f`, the **rotation objective** is the instantaneous rate of loss decrease of
the update :math:`U = R f(R^\top M)`:

.. math:: J(R; M, f) = \langle M,\; R f(R^\top M) \rangle = \langle R^\top M,\; f(R^\top M)\rangle .

All projections in :mod:`aro.functional.projections` return RMS 1, so :math:`J` compares
rotations at equal update size. The paper reports :math:`J(R_\mathrm{ARO}) > J(R_\mathrm{eigen})`
for most matrices during training; :func:`relative_gain` measures
:math:`J(R)/J(R_\mathrm{eigen}) - 1`, with :math:`R_\mathrm{eigen}` the exact eigenvectors of
:math:`MM^\top`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .functional.projections import Projection
from .functional.rotation import eigen_rotation

__all__ = ["cosine", "exact_eigen_rotation", "orthogonality_error", "relative_gain", "rotation_objective"]


def rotation_objective(M: Tensor, R: Tensor | None, f: Projection) -> Tensor:
    r""":math:`J(R; M, f) = \langle M, R f(R^\top M)\rangle` per matrix, shape ``M.shape[:-2]``.

    ``R=None`` is the identity rotation. Computed in float64 for float64 input, else float32.
    """
    X = M if R is None else R.mT @ M
    return (X * f(X)).sum(dim=(-2, -1))


def exact_eigen_rotation(M: Tensor) -> Tensor:
    r"""Eigenvectors of :math:`MM^\top`, descending eigenvalue (columns sign-fixed)."""
    eye = torch.eye(M.shape[-2], dtype=M.dtype, device=M.device).expand(*M.shape[:-2], -1, -1)
    return eigen_rotation(M, eye).Q


def relative_gain(M: Tensor, R: Tensor, f: Projection) -> Tensor:
    r""":math:`J(R)/J(R_\mathrm{eigen}) - 1` per matrix (positive: ``R`` beats the eigen-rotation)."""
    j = rotation_objective(M, R, f)
    j_eig = rotation_objective(M, exact_eigen_rotation(M), f)
    return j / j_eig.clamp_min(torch.finfo(j_eig.dtype).tiny) - 1.0


def orthogonality_error(R: Tensor) -> Tensor:
    r""":math:`\max_{ij} |(R^\top R - I)_{ij}|` per matrix."""
    eye = torch.eye(R.shape[-1], dtype=R.dtype, device=R.device)
    return (R.mT @ R - eye).abs().amax(dim=(-2, -1))


def cosine(A: Tensor, B: Tensor) -> Tensor:
    r""":math:`\langle A, B\rangle / (\|A\|_F \|B\|_F)` per matrix (0 when either is zero)."""
    num = (A * B).sum(dim=(-2, -1))
    den = torch.linalg.matrix_norm(A) * torch.linalg.matrix_norm(B)
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), torch.zeros_like(num))
