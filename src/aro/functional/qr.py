r"""Orthonormalization of the cross-Gram: Householder QR and shifted Cholesky QR (the paper's §4, scalable rotation estimation).

ARO's rotation is the Q factor of a square matrix :math:`A` (the cross-Gram). Two backends:

* ``"householder"``: LAPACK's ``geqrf`` + ``orgqr`` (:func:`torch.geqrf`,
  :func:`torch.linalg.householder_product`), with column signs fixed so that
  :math:`\mathrm{diag}(R) \ge 0` (deterministic, and equal to what Cholesky QR returns).
* ``"shifted_cholesky"``: :math:`\hat A = A/\|A\|_F`, :math:`P = \hat A^\top\hat A + sI`,
  :math:`P = LL^\top`, :math:`Q_1 = \hat A L^{-\top}`; then an optional second, unshifted
  Cholesky QR pass on :math:`Q_1` (CholeskyQR2). The shift is relative,
  :math:`s = c\,u` with :math:`u` the unit roundoff of the dtype, since :math:`\|\hat A\|_F=1`.
  Matrix products, one Cholesky and one triangular solve: fast on GPUs, where Householder
  is not. Every matrix whose Cholesky fails (``cholesky_ex`` info), whose result is not
  finite, or whose first pass is too far from orthogonal for the second pass to repair
  (:math:`\|Q_1^\top Q_1 - I\|_F > 1/2`) falls back to Householder; the count is returned.

Both keep the previous rotation for a matrix whose :math:`A` is zero or not finite
(a degenerate guard): a step without signal must not reset or corrupt the frame.
The same idea covers a *partially* degenerate :math:`A` (a low-rank momentum, common in real
networks): :func:`orthonormalize` factors :math:`\hat A + \delta R_{t-1}` with
:math:`\hat A = A/\|A\|_F` and :math:`\delta = 100\,u`, so the columns for directions
where :math:`A` carries no signal are built from the previous frame (a smooth, deterministic
function of :math:`A` and :math:`R_{t-1}`) instead of from rounding noise, and
:math:`\kappa \le 1/\delta` keeps the shifted Cholesky QR within reach of its repair
passes (no fallback on rank-deficient momenta). Directions with singular value :math:`\sigma \gg \delta` move by :math:`O(\delta/\sigma)`,
below fp32 rounding of the cross-Gram itself.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .numerics import amax_abs

__all__ = ["QR_METHODS", "Orthonormalized", "householder_qr", "orthonormalize", "polar", "shifted_cholesky_qr"]

QR_METHODS = ("householder", "shifted_cholesky")

# Shift multiplier c in s = c*u (u = unit roundoff). s must exceed the rounding error of
# forming A^T A (about n*u*||A||^2) for Cholesky to succeed on rank-deficient A, and stay
# small so that Q_1 is close enough to orthogonal for one CholeskyQR pass to finish the job.
DEFAULT_SHIFT = 100.0

# Largest ||Q_1^T Q_1 - I||_F for which the second CholeskyQR pass is trusted: cond(Q_1)^2 is
# then at most 3, so the second pass is accurate to a few units of roundoff.
MAX_FIRST_PASS_ERROR = 0.5

# delta in A_hat + delta*R_prev, in units of the unit roundoff (see the module docstring).
WARM_START = 100.0


class Orthonormalized(NamedTuple):
    """Result of :func:`orthonormalize`: the rotations and what happened on the way.

    The counts are 0-d int64 tensors on ``Q``'s device, so reading them is the only sync.
    """

    Q: Tensor
    fallbacks: Tensor  # shifted-Cholesky matrices redone by Householder
    degenerate: Tensor  # matrices with zero / non-finite input that kept the previous rotation


def householder_qr(A: Tensor) -> Tensor:
    r"""Q factor of :math:`A = QR` (batched, square or tall) with :math:`\mathrm{diag}(R)\ge 0`."""
    # geqrf + orgqr rather than linalg.qr, which also writes out R (the diagonal is enough)
    H, tau = torch.geqrf(A)
    Q = torch.linalg.householder_product(H, tau)
    d = torch.diagonal(H, dim1=-2, dim2=-1)
    return Q.mul_(torch.where(d < 0, -1.0, 1.0).unsqueeze(-2))


def _cholesky_qr_pass(A: Tensor, shift: float, gram: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One (shifted) Cholesky QR pass: Q = A L^{-T} with L L^T = A^T A + shift*I.

    Returns Q and a per-matrix success mask (Cholesky succeeded and Q is finite). ``gram``
    is A^T A when the caller has it already.
    """
    P = A.mT @ A if gram is None else gram.clone()
    if shift:
        P.diagonal(dim1=-2, dim2=-1).add_(shift)
    L, info = torch.linalg.cholesky_ex(P)
    Q = torch.linalg.solve_triangular(L.mT, A, upper=True, left=False)
    ok = (info == 0) & torch.isfinite(Q).all(dim=-1).all(dim=-1)
    return Q, ok


def shifted_cholesky_qr(A: Tensor, *, shift: float = DEFAULT_SHIFT, cholqr2: bool = True) -> tuple[Tensor, Tensor]:
    r"""Shifted Cholesky QR of ``A`` (batched). Returns ``(Q, ok)``.

    The shifted pass alone leaves :math:`\|Q_1^\top Q_1 - I\| \approx s/\sigma_\min(\hat A)^2`,
    but bounds :math:`\kappa(Q_1)^2 \lesssim 1/(c\,u)`, well inside what unshifted Cholesky QR
    can repair. With ``cholqr2`` the unshifted pass runs once when the first pass is already
    close to orthogonal (:math:`\|Q_1^\top Q_1-I\|_F \le 1/2`, CholeskyQR2) and twice otherwise
    (shiftedCholeskyQR3, Fukaya et al. 2020); a matrix still not close to orthogonal before
    its last pass is marked not ``ok``. ``ok`` also requires every Cholesky to succeed and a
    finite result; the caller redoes the others (see :func:`orthonormalize`).

    Args:
        A: ``(..., m, k)`` with ``m >= k``, finite and nonzero.
        shift: ``c`` in the relative shift :math:`s = c\,u\,\|A\|_F^2`.
        cholqr2: run the unshifted repair pass(es) (recommended; without them nothing is
            checked but the Cholesky).
    """
    u = torch.finfo(A.dtype).eps / 2
    A_hat = A / torch.linalg.vector_norm(A, dim=(-2, -1), keepdim=True)
    Q, ok = _cholesky_qr_pass(A_hat, shift * u)
    if not cholqr2:
        return Q, ok
    eye = torch.eye(Q.shape[-1], dtype=Q.dtype, device=Q.device)
    G = Q.mT @ Q
    close = torch.linalg.matrix_norm(G - eye) <= MAX_FIRST_PASS_ERROR
    if not bool(close.all()):  # shiftedCholeskyQR3: one more unshifted pass first
        # only for the matrices that need it: a matrix's result must not depend on which others
        # share its batch (a bucket on one process, a rank's share of it on several)
        Q3, ok3 = _cholesky_qr_pass(Q, 0.0, gram=G)
        keep = close[..., None, None]
        Q, G = torch.where(keep, Q, Q3), torch.where(keep, G, Q3.mT @ Q3)
        ok = ok & (ok3 | close)
        close = torch.linalg.matrix_norm(G - eye) <= MAX_FIRST_PASS_ERROR
    Q, ok2 = _cholesky_qr_pass(Q, 0.0, gram=torch.where(close[..., None, None], G, eye))
    return Q, ok & ok2 & close


def polar(A: Tensor) -> Tensor:
    r"""Orthogonal polar factor :math:`UV^\top` of :math:`A = U\Sigma V^\top` (exact Procrustes)."""
    U, _, Vh = torch.linalg.svd(A, full_matrices=False)
    return U @ Vh


def orthonormalize(
    A: Tensor,
    previous: Tensor,
    *,
    method: str = "householder",
    shift: float = DEFAULT_SHIFT,
    cholqr2: bool = True,
) -> Orthonormalized:
    r"""Rotation from the cross-Gram: :math:`R_t = \mathrm{QR}(A)` per matrix, guarded.

    Args:
        A: ``(..., m, m)`` cross-Grams.
        previous: ``(..., m, m)`` previous rotations, kept where ``A`` is zero or not finite.
        method: ``"householder"``, ``"shifted_cholesky"`` or ``"polar"`` (exact Procrustes,
            for the paper's QR ablation, §5).
        shift, cholqr2: see :func:`shifted_cholesky_qr`.
    """
    amax = amax_abs(A)
    usable = (amax > 0) & torch.isfinite(amax)  # (..., 1, 1)
    # on CPU the host sync is free and saves two full passes when every A is usable (the rule)
    every = A.device.type == "cpu" and bool(usable.all())
    X = A if every else torch.where(usable, A, previous)
    # A_hat = (X / max|X|) / ||X / max|X|||_F (a kept R_prev needs no scaling: its entries are <= 1);
    # 1/max is floored as in inverse_amax (the max is needed above too, so it is not recomputed)
    X = X * torch.where(usable, amax.clamp_min(torch.finfo(A.dtype).tiny).reciprocal(), 1.0)
    # A_hat + delta * R_prev: null directions of A are built from the previous frame
    delta = WARM_START * torch.finfo(A.dtype).eps / 2
    A_s = X.mul_(torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True).reciprocal_()).add_(previous, alpha=delta)
    fallbacks = torch.zeros((), dtype=torch.int64, device=A.device)
    if method == "householder":
        Q = householder_qr(A_s)
    elif method == "shifted_cholesky":
        Q, ok = shifted_cholesky_qr(A_s, shift=shift, cholqr2=cholqr2)
        bad = ~ok
        fallbacks = bad.sum()
        if bool(fallbacks):  # one host sync, only for this backend
            Q_flat, A_flat = Q.reshape(-1, *Q.shape[-2:]), A_s.reshape(-1, *A_s.shape[-2:])
            idx = bad.reshape(-1).nonzero().squeeze(-1)
            Q = Q_flat.index_copy(0, idx, householder_qr(A_flat[idx])).reshape(Q.shape)
    elif method == "polar":
        Q = polar(A_s)
    else:
        raise ValueError(f"Invalid qr method: {method!r}; expected one of {QR_METHODS + ('polar',)}")
    if not every:
        Q = torch.where(usable, Q, previous)
    return Orthonormalized(Q, fallbacks, (~usable).sum())
