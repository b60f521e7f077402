r"""Base projections :math:`f` of normed steepest descent (the paper's §2-§3).

A base projection maps a (rotated) momentum matrix :math:`X \in \mathbb{R}^{m\times n}` to the
steepest-descent direction of some norm, :math:`f(X) = \arg\max_{\|Z\|\le 1}\langle X, Z\rangle`.
Every function here

* works on batches ``(..., m, n)`` and treats the last two dimensions as the matrix;
* is scale invariant, :math:`f(cX) = f(X)` for :math:`c > 0`, and first divides ``X`` by its
  largest absolute entry, so gradients from 1e-30 to 1e30 neither underflow nor overflow;
* returns a matrix of RMS 1 (:math:`\|f(X)\|_F = \sqrt{mn}`), or exactly zero when ``X`` is
  zero, so the later RMS matching only rescales;
* is equivariant under signed permutations of rows, :math:`f(DX) = D f(X)`, which is why the
  signs of the rotation's columns do not matter.

Stateless projections are plain functions ``f(X) -> Tensor`` with their options bound by
:func:`functools.partial`. Sinkhorn and row-norm are *diagonal scalings*,
:math:`f(X) = D_a X D_b`; :func:`make_projection` returns them as :class:`DiagonalScaling`,
which also exposes the vectors ``(a, b)``, so that the rotated step can apply them inside its
matrix products instead of writing :math:`f(X)` out (:mod:`aro.functional.rotation`). The Adam
projection keeps a second moment and is the class :class:`AdamProjection`, used through
:func:`lookahead` and :func:`project_`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable, NamedTuple, Union

import torch
from torch import Tensor

from .numerics import inverse_amax, rms_normalize, unit_scale

__all__ = [
    "AdamProjection",
    "DiagonalScaling",
    "Scalings",
    "apply_scalings",
    "Projection",
    "SINKHORN_VARIANTS",
    "STATELESS_PROJECTIONS",
    "identity",
    "lookahead",
    "make_projection",
    "newton_schulz",
    "project_",
    "row_norm",
    "row_norm_scalings",
    "sign",
    "sinkhorn",
    "sinkhorn_scalings",
]

SINKHORN_VARIANTS = ("simultaneous", "alternating")


class Scalings(NamedTuple):
    r"""The vectors of a diagonal-scaling projection :math:`f(X) = D_a X D_b`."""

    row: Tensor  # a, (..., m)
    col: Tensor  # b, (..., n)


def apply_scalings(X: Tensor, s: tuple[Tensor, Tensor]) -> Tensor:
    r""":math:`D_a X D_b` for ``X (..., m, n)`` and ``s = (a, b)`` (a :class:`Scalings`)."""
    a, b = s
    return (X * a.unsqueeze(-1)).mul_(b.unsqueeze(-2))


@dataclass(frozen=True)
class DiagonalScaling:
    r"""A base projection of the form :math:`f(X) = D_a X D_b` (Sinkhorn, row-norm).

    Calling it returns :math:`f(X)`; :attr:`scalings` returns the vectors ``(a, b)``
    (:class:`Scalings`), which the rotated step folds into its products:
    :math:`M f(Z)^\top = (M D_b) Z^\top D_a` and :math:`R f(Z) = (R D_a) Z D_b`.
    """

    scalings: Callable[[Tensor], Scalings]
    # the same vectors for an X known to be bounded (see _scaled_squares: R^T M for M divided by
    # its own largest entry): skips dividing X by its largest entry, two reductions and a full
    # pass per call (None: ``scalings``)
    bounded_scalings: Callable[[Tensor], Scalings] | None = None

    def __call__(self, X: Tensor) -> Tensor:
        X = unit_scale(X)  # so that no scaling overflows, whatever the scale of X
        return apply_scalings(X, self.of_bounded(X))

    def of_bounded(self, X: Tensor) -> Scalings:
        r"""``(a, b)`` of a bounded ``X`` (see :func:`_scaled_squares`)."""
        return (self.bounded_scalings or self.scalings)(X)


def identity(X: Tensor) -> Tensor:
    r""":math:`f(X) = X/\mathrm{RMS}(X)`: the Frobenius-norm steepest descent direction.

    With this f, ARO's rotation is the power-iteration eigen-rotation (the eigen policy of the paper's §3).
    """
    return rms_normalize(unit_scale(X))


def sign(X: Tensor) -> Tensor:
    r""":math:`f(X) = \mathrm{sign}(X)`, the :math:`\ell_\infty` steepest descent (SignGD).

    Entries smaller than :math:`m\,u\,\max|X|` (the rounding error of the product
    :math:`R^\top M` that made them; :math:`u` the unit roundoff) count as zero: their sign is
    noise. This matters for square matrices, where ARO-Sign produces *exact* zeros in
    :math:`R^\top M` (cofactors of a ±1 matrix) that rounding would otherwise turn into ±1.
    The result is renormalized to RMS 1.
    """
    X = unit_scale(X)
    tol = X.shape[-2] * torch.finfo(X.dtype).eps / 2
    return rms_normalize(torch.where(X.abs() > tol, torch.sign(X), torch.zeros_like(X)))


def row_norm(X: Tensor, *, eps: float = 1e-8) -> Tensor:
    r""":math:`f(X) = \sqrt{n}\,D_r(X)^{-1}X`: every row scaled to norm :math:`\sqrt{n}`.

    Steepest descent for the max-row-norm; ARO with it converges to Muon's
    :math:`\sqrt{n}\,UV^\top`, Muon's direction. Rows with norm below ``eps`` (relative to the
    largest entry) or at rounding-noise level (see :func:`_signal_masks`) are set to zero.
    """
    return DiagonalScaling(partial(row_norm_scalings, eps=eps))(X)


def row_norm_scalings(X: Tensor, *, eps: float = 1e-8) -> Scalings:
    r"""The diagonal scalings of :func:`row_norm`: :math:`f(X) = D_a X`, ``b`` all ones.

    Always divides ``X`` by its largest entry first: ``eps`` is relative to it."""
    inv, S = _scaled_squares(X, bounded=False)
    m, n = X.shape[-2], X.shape[-1]
    row_keep = _signal_masks(S, m, n)[0]
    r2 = S.sum(dim=-1)
    row_keep = row_keep & (r2 > eps * eps)
    kept = row_keep.sum(dim=-1, keepdim=True).to(X.dtype)
    # kept rows have norm sqrt(n) after scaling, so RMS = sqrt(kept / m)
    rms = (kept / m).sqrt()
    a = torch.where(row_keep, math.sqrt(n) / torch.where(row_keep, r2, 1.0).sqrt(), 0.0)
    a = a * (inv.squeeze(-1) / torch.where(rms > 0, rms, 1.0))
    return Scalings(a, torch.ones(X.shape[:-2] + (n,), dtype=X.dtype, device=X.device))


def _scaled_squares(X: Tensor, bounded: bool) -> tuple[Tensor, Tensor]:
    r"""``(inv, S)``: :math:`S = (\mathrm{inv}\,X)\odot(\mathrm{inv}\,X)` with ``inv`` = 1 / the
    largest entry of each matrix (``(..., 1, 1)``), or ``inv = 1`` for a ``bounded`` ``X``.

    Bounded means :math:`|X_{ij}| \le \sqrt{\max(m,n)}` with a largest row of squared norm at
    least :math:`1/m`, as :math:`R^\top M` is for :math:`M` divided by its own largest entry (its
    Frobenius norm is at least 1): the squares cannot overflow or fall to subnormals, and a row
    that carries signal (:func:`_signal_masks`: above :math:`\tau^2` times the largest) stays far
    above the :math:`\epsilon^2` floor of Sinkhorn's first products, which is all the division
    guards. A member of a shared rotation divided by a factor common to all members is *not*
    bounded in this sense (it may be many orders below 1); the rotated step does not call it so."""
    if bounded:
        return torch.ones((1,) * X.ndim, dtype=X.dtype, device=X.device), torch.square(X)
    inv = inverse_amax(X)
    return inv, (X * inv).square_()


def sinkhorn(
    X: Tensor,
    *,
    num_iters: int = 5,
    variant: str = "simultaneous",
    eps: float = 1e-8,
) -> Tensor:
    r"""Sinkhorn projection :math:`f_\mathrm{Sink}` (SinkGD; ARO-Sinkhorn), RMS 1.

    Balances the row and column norms of ``X`` by diagonal scalings, :math:`f(X) = D_a X D_b`,
    so that rows have norm :math:`\sqrt n` and columns :math:`\sqrt m`. With
    :math:`Y = D_a X D_b`, one iteration is

    * ``"simultaneous"`` (as written in the ARO paper): both diagonals from the same ``Y``,
      :math:`Y \leftarrow \sqrt{mn}\; D_r(Y)^{-1}\, Y\, D_c(Y)^{-1}`;
    * ``"alternating"`` (SinkGD): :math:`Y \leftarrow \sqrt{n}\,D_r(Y)^{-1}Y`, then
      :math:`Y \leftarrow \sqrt{m}\,Y D_c(Y)^{-1}`.

    The scalings are computed by :func:`sinkhorn_scalings` and applied once.

    Args:
        X: ``(..., m, n)`` input.
        num_iters: number of iterations ``K`` (the paper's default 5).
        variant: ``"simultaneous"`` or ``"alternating"``.
        eps: norm floor (relative to the largest entry of ``X``).
    """
    scalings = partial(sinkhorn_scalings, num_iters=num_iters, variant=variant, eps=eps)
    return DiagonalScaling(scalings, partial(scalings, bounded=True))(X)


def sinkhorn_scalings(
    X: Tensor,
    *,
    num_iters: int = 5,
    variant: str = "simultaneous",
    eps: float = 1e-8,
    bounded: bool = False,
) -> Scalings:
    r"""The diagonal scalings ``(a, b)`` of :func:`sinkhorn`: :math:`f(X) = D_a X D_b`, RMS 1.

    Rescaling the rows of :math:`Y = D_a X D_b` to norm :math:`\sqrt n` sets
    :math:`a_i = \sqrt n / \|(X D_b)_i\|` whatever ``a`` was, so only the scaling vectors are
    iterated. With :math:`S = X\odot X`, :math:`u = a\odot a`, :math:`v = b\odot b` this is
    Sinkhorn-Knopp on :math:`S`:

    .. math:: u \leftarrow n / (S v),\qquad v \leftarrow m / (S^\top u)

    (``simultaneous`` uses the old :math:`u` for :math:`v`, ``alternating`` the new one): two
    matrix-vector products with ``S`` per iteration, no rewriting of the matrix. The RMS of the
    result comes from the vectors too, :math:`\|D_aXD_b\|_F^2 = u^\top S v`, so RMS 1 is folded
    into ``a``. Squared norms are clamped below at :math:`\epsilon^2` (``X`` is first divided by
    its largest entry, which ``a`` absorbs), so nothing overflows, and rows or columns that are
    only rounding noise (see :func:`_signal_masks`) get a zero scaling.

    ``bounded``: the caller guarantees :math:`|X_{ij}| \le \sqrt{\max(m, n)}` (the rotated step's
    :math:`R^\top M` for :math:`M` divided by its largest entry; see :func:`_scaled_squares`),
    so the division by the largest entry is skipped: :math:`D_a X D_b` differs by rounding only
    (``a`` and ``b`` themselves may differ by reciprocal factors).

    Returns:
        :class:`Scalings` ``(a, b)`` of shapes ``(..., m)`` and ``(..., n)``, relative to ``X``
        itself (``a`` includes the RMS normalization and, unless ``bounded``,
        :math:`1/\max_{ij}|X_{ij}|`).
    """
    if variant not in SINKHORN_VARIANTS:
        raise ValueError(f"Invalid sinkhorn variant: {variant!r}; expected one of {SINKHORN_VARIANTS}")
    lead, (m, n) = X.shape[:-2], X.shape[-2:]
    X = X.reshape(-1, m, n)  # one batch dimension, so that the products below are plain bmm
    inv, S = _scaled_squares(X, bounded)
    floor = eps * eps
    row_keep, col_keep = _signal_masks(S, m, n)
    # vectors are kept as rows, u (B, 1, m) and v (B, 1, n), so that every product below is a
    # row vector times S^T or S (BLAS runs these at memory speed; multiply-and-sum would write a
    # temporary as large as S); masked rows / columns have a zero numerator
    u = row_keep.to(X.dtype).unsqueeze(-2)  # a*a
    v = col_keep.to(X.dtype).unsqueeze(-2)  # b*b
    nu, mv = u * n, v * m
    ST = S.mT
    for _ in range(num_iters):
        u_new = nu / torch.bmm(v, ST).clamp_min_(floor)
        if variant == "alternating":
            u = u_new
        v = mv / torch.bmm(u, S).clamp_min_(floor)
        u = u_new
    # ||D_sqrt(u) X D_sqrt(v)||_F^2 = u^T S v, so RMS = sqrt(u^T S v / (m n))
    rms = (torch.bmm(torch.bmm(v, ST), u.mT) / (m * n)).sqrt_()
    scale = torch.where(rms > 0, inv / torch.where(rms > 0, rms, 1.0), 0.0)
    return Scalings(u.sqrt_().mul_(scale).reshape(lead + (m,)), v.sqrt_().reshape(lead + (n,)))


def _signal_masks(S: Tensor, m: int, n: int) -> tuple[Tensor, Tensor]:
    r"""Rows and columns of :math:`X` (given :math:`S = X\odot X`) that carry signal.

    A row (column) whose norm is below :math:`\tau = \max(1000\,u,\ 10\,u\sqrt{\max(m,n)})`
    times the largest row (column) norm -- :math:`u` the unit roundoff -- is rounding noise of
    the product that made ``X`` (e.g. :math:`R^\top M` for a rank-deficient :math:`M`, such as
    a softmax router's gradient, whose rows sum to zero). Balancing would blow it up to full
    size, so it is left at zero. The floor :math:`1000\,u` sits ten times above the
    :math:`100\,u` warm-start perturbation of the rotation (:mod:`aro.functional.qr`), which
    is what a null direction of :math:`M` leaks into such a row.
    """
    u = torch.finfo(S.dtype).eps / 2
    tol2 = max(1000.0 * u, 10.0 * u * math.sqrt(max(m, n))) ** 2
    rows, cols = S.sum(dim=-1), S.sum(dim=-2)
    row_keep = rows > tol2 * rows.amax(dim=-1, keepdim=True)
    col_keep = cols > tol2 * cols.amax(dim=-1, keepdim=True)
    return row_keep, col_keep


# Quintic Newton-Schulz coefficients of Muon (K. Jordan, github.com/KellerJordan/Muon), also
# torch.optim.Muon's defaults: maximise the slope at zero, converge to singular values ~[0.7, 1.2].
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz(X: Tensor, *, steps: int = 5) -> Tensor:
    r"""Approximate polar factor :math:`UV^\top` by Muon's quintic Newton-Schulz iteration, RMS 1.

    Rotation-equivariant, so ARO with this f is Muon whatever the rotation (a rotation-equivariant f, the paper's §3); with
    ``rotation="identity"`` and ``nesterov=True`` it is Muon with RMS matching, and the benchmark
    uses it for 3-D expert tensors, which :class:`torch.optim.Muon` does not accept.
    Runs in the input's dtype (float32 here), not bf16 as Muon does.
    """
    a, b, c = NS_COEFFICIENTS
    transposed = X.shape[-2] > X.shape[-1]
    Y = X.mT if transposed else X
    Y = unit_scale(Y)
    Y = Y / torch.linalg.vector_norm(Y, dim=(-2, -1), keepdim=True).clamp_min(torch.finfo(Y.dtype).tiny)
    for _ in range(steps):
        A = Y @ Y.mT
        B = b * A + c * (A @ A)
        Y = a * Y + B @ Y
    return rms_normalize(Y.mT if transposed else Y)


@dataclass(frozen=True)
class AdamProjection:
    r"""Adam as a base projection, with ARO's look-ahead (the paper's §4, "ARO-Adam").

    The second moment ``V`` lives in the rotated frame and tracks the squared rotated
    momentum :math:`Z = R^\top M`. Because the new rotation must be built before ``V`` is
    updated, the cross-Gram uses a scratch second moment in the old frame:

    .. math::
        \tilde Z = R_{t-1}^\top M_t,\quad \tilde V = \beta_2 V_{t-1} + (1-\beta_2)\tilde Z^2,
        \quad \tilde D = \tilde Z/(\sqrt{\tilde V/c_t}+\epsilon)\quad\text{(not stored)}

    and the update uses the new frame, :math:`Z = R_t^\top M_t`,
    :math:`V_t = \beta_2 V_{t-1} + (1-\beta_2) Z^2`, :math:`D = Z/(\sqrt{V_t/c_t}+\epsilon)`,
    with bias correction :math:`c_t = 1-\beta_2^t`. ``V`` is not re-projected when the
    rotation changes (as in the paper). Both outputs are renormalized to RMS 1.

    Second moments saturate at the dtype's largest finite value instead of overflowing.
    """

    beta2: float = 0.95
    eps: float = 1e-8

    def _second_moment(self, Z: Tensor, V: Tensor) -> Tensor:
        # V~ = beta2*V + (1-beta2)*Z^2, kept finite
        V_new = torch.addcmul(V * self.beta2, Z, Z, value=1.0 - self.beta2)
        return V_new.clamp_(max=torch.finfo(V_new.dtype).max)

    def _direction(self, Z: Tensor, V: Tensor, bias_correction: Tensor) -> Tensor:
        # sqrt(V)/sqrt(c) rather than sqrt(V/c): a saturated V must not overflow to Inf here
        return rms_normalize(unit_scale(Z / (V.sqrt() / bias_correction.sqrt() + self.eps)))

    def lookahead(self, Z: Tensor, V: Tensor, bias_correction: Tensor) -> Tensor:
        """Scratch direction :math:`\\tilde D` for the cross-Gram; ``V`` is not modified."""
        return self._direction(Z, self._second_moment(Z, V), bias_correction)

    def project_(self, Z: Tensor, V: Tensor, bias_correction: Tensor) -> Tensor:
        """Update ``V`` in place with ``Z`` and return the direction :math:`D`."""
        V.copy_(self._second_moment(Z, V))
        return self._direction(Z, V, bias_correction)


Projection = Union[Callable[[Tensor], Tensor], DiagonalScaling, AdamProjection]

STATELESS_PROJECTIONS: dict[str, Callable[..., Tensor]] = {
    "sinkhorn": sinkhorn,
    "sign": sign,
    "row_norm": row_norm,
    "identity": identity,
    "newton_schulz": newton_schulz,
}


def make_projection(
    base: str | Callable[[Tensor], Tensor],
    *,
    sinkhorn_iters: int = 5,
    sinkhorn_variant: str = "simultaneous",
    beta2: float = 0.95,
    eps: float = 1e-8,
) -> Projection:
    """Resolve a projection name (``"sinkhorn"``, ``"sign"``, ``"row_norm"``, ``"identity"``,
    ``"newton_schulz"``, ``"adam"``) or a user callable ``f(X) -> Tensor`` to a :data:`Projection`."""
    if callable(base):
        return base
    if base == "adam":
        return AdamProjection(beta2=beta2, eps=eps)
    if base == "sinkhorn":
        if sinkhorn_variant not in SINKHORN_VARIANTS:
            raise ValueError(f"Invalid sinkhorn variant: {sinkhorn_variant!r}; expected one of {SINKHORN_VARIANTS}")
        scalings = partial(sinkhorn_scalings, num_iters=sinkhorn_iters, variant=sinkhorn_variant)
        return DiagonalScaling(scalings, partial(scalings, bounded=True))
    if base == "row_norm":
        return DiagonalScaling(row_norm_scalings)
    if base in STATELESS_PROJECTIONS:
        return STATELESS_PROJECTIONS[base]
    names = sorted(STATELESS_PROJECTIONS) + ["adam"]
    raise ValueError(f"Invalid base projection: {base!r}; expected one of {names} or a callable")


def lookahead(f: Projection, X: Tensor, f_state: Tensor | None, bias_correction: Tensor | None) -> Tensor:
    """f applied in the previous frame, for the cross-Gram; never modifies state."""
    if isinstance(f, AdamProjection):
        return f.lookahead(X, f_state, bias_correction)
    return f(X)


def project_(f: Projection, X: Tensor, f_state: Tensor | None, bias_correction: Tensor | None) -> Tensor:
    """f applied in the new frame, for the update; the Adam projection updates its state."""
    if isinstance(f, AdamProjection):
        return f.project_(X, f_state, bias_correction)
    return f(X)
