r"""Rotation policies and the rotated steepest-descent step (SPEC §2, §4).

Every method here updates a matrix by :math:`\Delta W \propto -R\,f(R^\top M)` with an
orthogonal :math:`R` acting on the rows of the (oriented) momentum :math:`M`. They differ in
how :math:`R_t` is chosen from :math:`M_t` and :math:`R_{t-1}`:

================  ===============================================================
``"aro"``          :math:`R_t = \mathrm{QR}(M\,f(R_{t-1}^\top M)^\top)` (the cross-Gram)
``"eigen"``        :math:`R_t = \mathrm{QR}(M M^\top R_{t-1})`: one warm-started power-iteration
                   step toward the eigenvectors of :math:`MM^\top` (ARO with f = identity)
``"eigen_exact"``  eigenvectors of :math:`MM^\top` by ``eigh``, eigenvalues descending
``"polar"``        :math:`R_t = \mathrm{Polar}(M\,f(R_{t-1}^\top M)^\top)`: exact Procrustes
``"identity"``     :math:`R = I`: momentum SinkGD / SignGD, no rotation state
================  ===============================================================

The momentum is kept in the parameter frame (never in the rotated one), so nothing has to
be re-expressed when :math:`R` changes; only the Adam projection's second moment lives in the
rotated frame, and the paper does not re-project it either.

All functions are batched over leading dimensions and are pure except :func:`rotated_step`'s
Adam second moment, which is updated in place (it is the projection's state).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .projections import Projection, lookahead, project_, unit_scale
from .qr import DEFAULT_SHIFT, Orthonormalized, orthonormalize

__all__ = [
    "ROTATION_POLICIES",
    "RotatedStep",
    "cross_gram",
    "eigen_rotation",
    "new_rotation",
    "rotated_step",
    "rotated_update",
]

ROTATION_POLICIES = ("aro", "eigen", "eigen_exact", "polar", "identity")


class RotatedStep(NamedTuple):
    """Output of :func:`rotated_step`."""

    update: Tensor  # U = R f(R^T M), RMS 1 per matrix (zero where M is zero)
    rotation: Tensor | None  # R_t (None for the identity policy)
    fallbacks: Tensor  # 0-d count of shifted-Cholesky fallbacks to Householder
    degenerate: Tensor  # 0-d count of matrices that kept R_{t-1} (zero / non-finite A)


def cross_gram(
    M: Tensor,
    R: Tensor,
    *,
    policy: str,
    f: Projection,
    f_state: Tensor | None = None,
    bias_correction: Tensor | None = None,
) -> Tensor:
    r"""The matrix whose Q factor is the new rotation.

    ``"aro"``/``"polar"``: :math:`A = M\,f(R_{t-1}^\top M)^\top` (f in look-ahead mode, state
    untouched); ``"eigen"``: :math:`A = M (R_{t-1}^\top M)^\top = MM^\top R_{t-1}`. ``M`` enters
    divided by its largest entry (QR is scale invariant), so no product overflows.
    """
    M_s = unit_scale(M)
    if policy == "eigen":
        return M_s @ (R.mT @ M_s).mT
    return M_s @ lookahead(f, R.mT @ M, f_state, bias_correction).mT


def eigen_rotation(M: Tensor, previous: Tensor) -> Orthonormalized:
    r"""Exact eigenvectors of :math:`MM^\top`, ordered by descending eigenvalue.

    Each column's sign is fixed so that its largest-magnitude entry is positive. Zero or
    non-finite ``M`` keeps ``previous``.
    """
    M_s = unit_scale(M)
    amax = M.abs().amax(dim=(-2, -1))
    usable = (amax > 0) & torch.isfinite(amax)
    eye = torch.eye(M.shape[-2], dtype=M.dtype, device=M.device)
    C = torch.where(usable[..., None, None], M_s @ M_s.mT, eye)
    _, V = torch.linalg.eigh(C)
    V = V.flip(-1)
    pivot = V.gather(-2, V.abs().argmax(dim=-2, keepdim=True))
    V = V * torch.where(pivot < 0, -1.0, 1.0).to(V.dtype)
    Q = torch.where(usable[..., None, None], V, previous)
    zero = torch.zeros((), dtype=torch.int64, device=M.device)
    return Orthonormalized(Q, zero, (~usable).sum())


def new_rotation(
    M: Tensor,
    R: Tensor,
    *,
    policy: str = "aro",
    f: Projection,
    f_state: Tensor | None = None,
    bias_correction: Tensor | None = None,
    qr: str = "householder",
    shift: float = DEFAULT_SHIFT,
    cholqr2: bool = True,
) -> Orthonormalized:
    """:math:`R_t` from :math:`M_t` and :math:`R_{t-1}` under ``policy`` (not ``"identity"``)."""
    if policy == "eigen_exact":
        return eigen_rotation(M, R)
    A = cross_gram(M, R, policy=policy, f=f, f_state=f_state, bias_correction=bias_correction)
    method = "polar" if policy == "polar" else qr
    return orthonormalize(A, R, method=method, shift=shift, cholqr2=cholqr2)


def rotated_update(
    M: Tensor,
    R: Tensor | None,
    *,
    f: Projection,
    f_state: Tensor | None = None,
    bias_correction: Tensor | None = None,
) -> Tensor:
    r""":math:`U = R\,f(R^\top M)` (or :math:`f(M)` when ``R`` is None); Adam state updated."""
    if R is None:
        return project_(f, M, f_state, bias_correction)
    return R @ project_(f, R.mT @ M, f_state, bias_correction)


def rotated_step(
    M: Tensor,
    R: Tensor | None,
    *,
    policy: str = "aro",
    f: Projection,
    f_state: Tensor | None = None,
    bias_correction: Tensor | None = None,
    qr: str = "householder",
    shift: float = DEFAULT_SHIFT,
    cholqr2: bool = True,
) -> RotatedStep:
    r"""One rotated steepest-descent direction for a batch of oriented momenta.

    .. math::
        R_t = \mathrm{policy}(M_t, R_{t-1}),\qquad U_t = R_t\, f(R_t^\top M_t)

    Args:
        M: ``(..., m, n)`` momentum (oriented: the rotation acts on the ``m`` rows).
        R: ``(..., m, m)`` previous rotations, or None for ``policy="identity"``.
        policy: one of :data:`ROTATION_POLICIES`.
        f: base projection (see :mod:`aro.functional.projections`).
        f_state: ``(..., m, n)`` second moment of the Adam projection (updated in place).
        bias_correction: ``(..., 1, 1)`` Adam bias correction :math:`1-\beta_2^t`.
        qr, shift, cholqr2: orthonormalization backend (see :mod:`aro.functional.qr`).
    """
    if policy not in ROTATION_POLICIES:
        raise ValueError(f"Invalid rotation policy: {policy!r}; expected one of {ROTATION_POLICIES}")
    zero = torch.zeros((), dtype=torch.int64, device=M.device)
    if policy == "identity":
        return RotatedStep(rotated_update(M, None, f=f, f_state=f_state, bias_correction=bias_correction), None, zero, zero)
    if R is None:
        raise ValueError(f"rotation policy {policy!r} needs the previous rotation R (got None)")
    Q, fallbacks, degenerate = new_rotation(
        M, R, policy=policy, f=f, f_state=f_state, bias_correction=bias_correction, qr=qr, shift=shift, cholqr2=cholqr2
    )
    U = rotated_update(M, Q, f=f, f_state=f_state, bias_correction=bias_correction)
    return RotatedStep(U, Q, fallbacks, degenerate)
