r"""Rotation policies and the rotated steepest-descent step (the paper's §3 and §6).

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

**Shared rotations** (the paper's §6): one :math:`R` may serve several *members*
:math:`M_1, \dots, M_J` (all :math:`d \times n_j`, the rotated side first). The cross-Gram is
then estimated either as the **sum** of the members' cross-Grams,
:math:`A = \sum_j M_j f(R^\top M_j)^\top`, or by applying f to the **stack**
:math:`[M_1 | \dots | M_J]`, :math:`A = M_\mathrm{stack} f(R^\top M_\mathrm{stack})^\top`; the two
agree for elementwise f (sign) and differ for Sinkhorn and row-norm, whose row norms span the
stack. Updates are always per member, :math:`U_j = R f(R^\top M_j)`. A *tall* member
(:math:`n_j < d`) spans only an :math:`n_j`-dimensional subspace; its rotated momentum has
:math:`d - n_j` directions of pure noise that Sinkhorn or row-norm would blow up, so
its update is projected back onto the span of its momentum, :math:`U_j \leftarrow Q_jQ_j^\top U_j`
with :math:`Q_j` an orthonormal basis of :math:`\mathrm{col}(M_j)`. A single member is
per-matrix ARO.

The momentum is kept in the parameter frame (never in the rotated one), so nothing has to
be re-expressed when :math:`R` changes; only the Adam projection's second moment lives in the
rotated frame, and the paper does not re-project it either.

All functions are batched over a leading unit dimension and are pure except for the Adam
projection's second moments, which are updated in place (they are the projection's state).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from .numerics import inverse_amax, unit_scale
from .projections import DiagonalScaling, Projection, lookahead, project_
from .qr import DEFAULT_SHIFT, Orthonormalized, householder_qr, orthonormalize

__all__ = [
    "ESTIMATORS",
    "ROTATION_POLICIES",
    "RotatedStep",
    "SharedStep",
    "cross_gram",
    "eigen_rotation",
    "new_rotation",
    "project_onto_span",
    "rotated_step",
    "rotated_update",
    "shared_rotated_step",
]

ROTATION_POLICIES = ("aro", "eigen", "eigen_exact", "polar", "identity")
ESTIMATORS = ("sum", "stack")


class RotatedStep(NamedTuple):
    """Output of :func:`rotated_step`."""

    update: Tensor  # U = R f(R^T M), RMS 1 per matrix (zero where M is zero)
    rotation: Tensor | None  # R_t (None for the identity policy)
    fallbacks: Tensor  # 0-d count of shifted-Cholesky fallbacks to Householder
    degenerate: Tensor  # 0-d count of matrices that kept R_{t-1} (zero / non-finite A)


class SharedStep(NamedTuple):
    """Output of :func:`shared_rotated_step`: one update per member."""

    updates: list[Tensor]
    rotation: Tensor | None
    fallbacks: Tensor
    degenerate: Tensor


def _common_scale(Ms: Sequence[Tensor]) -> list[Tensor]:
    """Divide all members of a unit by the same factor (the largest entry among them)."""
    inv = inverse_amax(Ms[0])
    for M in Ms[1:]:
        inv = torch.minimum(inv, inverse_amax(M))  # 1 / the largest entry among the members
    return [M * inv for M in Ms]


def _as_list(x, n: int) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x] * n


def mm(a: Tensor, b: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """``a @ b``, multiplied in ``dtype`` when given (inputs rounded to it, the product back
    in ``a``'s dtype): the products of ARO can run in bfloat16, as Muon's Newton-Schulz does."""
    if dtype is None or dtype == a.dtype:
        return a @ b
    return (a.to(dtype) @ b.to(dtype)).to(a.dtype)


def cross_gram(
    Ms: Sequence[Tensor] | Tensor,
    R: Tensor,
    *,
    policy: str,
    f: Projection,
    f_states: Sequence[Tensor | None] | Tensor | None = None,
    bias_correction: Tensor | None = None,
    estimator: str = "sum",
    matmul_dtype: torch.dtype | None = None,
    scaled: Sequence[Tensor] | None = None,
) -> Tensor:
    r"""The matrix whose Q factor is the new rotation.

    ``"aro"``/``"polar"``: :math:`A = \sum_j M_j\,f(R_{t-1}^\top M_j)^\top` (``"sum"``) or f on
    the stacked members (``"stack"``), f in look-ahead mode (state untouched); ``"eigen"``:
    :math:`A = \sum_j M_j M_j^\top R_{t-1}`. Members enter divided by a common factor, the
    largest entry among them (QR is scale invariant), so no product overflows; ``scaled`` are
    the members so divided, when the caller has them already.
    """
    Ms = [Ms] if isinstance(Ms, Tensor) else list(Ms)
    scaled = _common_scale(Ms) if scaled is None else list(scaled)
    if policy == "eigen":
        return sum(mm(Mj, mm(R.mT, Mj, matmul_dtype).mT, matmul_dtype) for Mj in scaled)
    states = _as_list(f_states, len(Ms))
    if estimator == "stack" and len(Ms) > 1:
        if any(s is not None for s in states):
            raise ValueError("the 'stack' estimator needs a stateless base projection (not 'adam')")
        Ms = scaled = [torch.cat(scaled, dim=-1)]
        states = [None]
    A = None
    for M, Mj, s in zip(Ms, scaled, states):
        if isinstance(f, DiagonalScaling):
            # M f(Z)^T = M (D_a Z D_b)^T = M (Z D_b)^T D_a: the scalings enter the products
            Z = mm(R.mT, Mj, matmul_dtype)
            # bounded when Mj holds the common largest entry: a single member, or the stack;
            # a member of a sum may be many orders below it (projections._scaled_squares)
            a, b = (f.of_bounded if len(Ms) == 1 else f.scalings)(Z)
            Aj = mm(Mj, Z.mul_(b.unsqueeze(-2)).mT, matmul_dtype).mul_(a.unsqueeze(-2))
        else:  # f (the Adam projection's state) sees the unscaled rotated momentum
            Aj = mm(Mj, lookahead(f, mm(R.mT, M, matmul_dtype), s, bias_correction).mT, matmul_dtype)
        A = Aj if A is None else A.add_(Aj)
    return A


def eigen_rotation(Ms: Sequence[Tensor] | Tensor, previous: Tensor) -> Orthonormalized:
    r"""Exact eigenvectors of :math:`\sum_j M_jM_j^\top`, ordered by descending eigenvalue.

    Each column's sign is fixed so that its largest-magnitude entry is positive. Zero or
    non-finite momenta keep ``previous``.
    """
    Ms = [Ms] if isinstance(Ms, Tensor) else list(Ms)
    scaled = _common_scale(Ms)
    C = sum(Mj @ Mj.mT for Mj in scaled)
    amax = C.abs().amax(dim=(-2, -1))
    usable = (amax > 0) & torch.isfinite(amax)
    eye = torch.eye(C.shape[-1], dtype=C.dtype, device=C.device)
    _, V = torch.linalg.eigh(torch.where(usable[..., None, None], C, eye))
    V = V.flip(-1)
    pivot = V.gather(-2, V.abs().argmax(dim=-2, keepdim=True))
    V = V * torch.where(pivot < 0, -1.0, 1.0).to(V.dtype)
    Q = torch.where(usable[..., None, None], V, previous)
    zero = torch.zeros((), dtype=torch.int64, device=C.device)
    return Orthonormalized(Q, zero, (~usable).sum())


def new_rotation(
    Ms: Sequence[Tensor] | Tensor,
    R: Tensor,
    *,
    policy: str = "aro",
    f: Projection,
    f_states: Sequence[Tensor | None] | Tensor | None = None,
    bias_correction: Tensor | None = None,
    estimator: str = "sum",
    qr: str = "householder",
    shift: float = DEFAULT_SHIFT,
    cholqr2: bool = True,
    matmul_dtype: torch.dtype | None = None,
    scaled: Sequence[Tensor] | None = None,
) -> Orthonormalized:
    """:math:`R_t` from the members' momenta and :math:`R_{t-1}` under ``policy`` (not ``"identity"``);
    ``scaled`` as in :func:`cross_gram`."""
    if policy == "eigen_exact":
        return eigen_rotation(Ms, R)
    A = cross_gram(Ms, R, policy=policy, f=f, f_states=f_states, bias_correction=bias_correction, estimator=estimator,
                   matmul_dtype=matmul_dtype, scaled=scaled)
    method = "polar" if policy == "polar" else qr
    return orthonormalize(A, R, method=method, shift=shift, cholqr2=cholqr2)


def rotated_update(
    M: Tensor,
    R: Tensor | None,
    *,
    f: Projection,
    f_state: Tensor | None = None,
    bias_correction: Tensor | None = None,
    matmul_dtype: torch.dtype | None = None,
    prescaled: bool = False,
) -> Tensor:
    r""":math:`U = R\,f(R^\top M)` (or :math:`f(M)` when ``R`` is None); Adam state updated.

    For a diagonal-scaling f the product is formed as :math:`(R D_a)\,Z\,D_b` with
    :math:`Z = R^\top M`, so :math:`f(Z)` is never written out; ``M`` is divided by its largest
    entry first (f is scale invariant; ``a`` would overflow for a tiny ``M``) unless
    ``prescaled`` says the caller did so (by ``M``'s own largest entry: then :math:`Z` is bounded,
    see ``projections._scaled_squares``).
    """
    if R is None:
        return project_(f, M, f_state, bias_correction)
    if isinstance(f, DiagonalScaling):
        Z = mm(R.mT, M if prescaled else _common_scale([M])[0], matmul_dtype)
        a, b = f.of_bounded(Z)  # Z = R^T M with M divided by its own largest entry
        return mm(R * a.unsqueeze(-2), Z, matmul_dtype).mul_(b.unsqueeze(-2))
    return mm(R, project_(f, mm(R.mT, M, matmul_dtype), f_state, bias_correction), matmul_dtype)


def project_onto_span(U: Tensor, M: Tensor) -> Tensor:
    r""":math:`Q Q^\top U` with :math:`Q` an orthonormal basis of :math:`\mathrm{col}(M)` (``M`` tall)."""
    Q = householder_qr(unit_scale(M))
    return Q @ (Q.mT @ U)


def shared_rotated_step(
    Ms: Sequence[Tensor],
    R: Tensor | None,
    *,
    policy: str = "aro",
    f: Projection,
    f_states: Sequence[Tensor | None] | None = None,
    bias_correction: Tensor | None = None,
    estimator: str = "sum",
    project_tall: bool = True,
    qr: str = "householder",
    shift: float = DEFAULT_SHIFT,
    cholqr2: bool = True,
    refresh: bool = True,
    matmul_dtype: torch.dtype | None = None,
) -> SharedStep:
    r"""One rotated steepest-descent step for units of members sharing a rotation.

    .. math::
        R_t = \mathrm{policy}(\{M_j\}, R_{t-1}),\qquad U_j = R_t\, f(R_t^\top M_j)

    Args:
        Ms: member momenta, each ``(U, d, n_j)`` (``U`` units batched; the rotation acts on ``d``).
        R: ``(U, d, d)`` previous rotations, or None for ``policy="identity"``.
        policy: one of :data:`ROTATION_POLICIES`.
        f: base projection (see :mod:`aro.functional.projections`).
        f_states: per member, the Adam projection's ``(U, d, n_j)`` second moment (in place).
        bias_correction: ``(U, 1, 1)`` Adam bias correction :math:`1-\beta_2^t`.
        estimator: ``"sum"`` or ``"stack"`` (see the module docstring; same for one member).
        project_tall: project the update of tall members (``n_j < d``) onto their span.
        qr, shift, cholqr2: orthonormalization backend (see :mod:`aro.functional.qr`).
        refresh: False keeps :math:`R_t = R_{t-1}` (a step between rotation refreshes).
        matmul_dtype: dtype of the products with :math:`R` (None: the input's; see :func:`mm`).
    """
    if policy not in ROTATION_POLICIES:
        raise ValueError(f"Invalid rotation policy: {policy!r}; expected one of {ROTATION_POLICIES}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"Invalid estimator: {estimator!r}; expected one of {ESTIMATORS}")
    Ms = list(Ms)
    states = _as_list(f_states, len(Ms))
    zero = torch.zeros((), dtype=torch.int64, device=Ms[0].device)
    if policy == "identity":
        updates = [rotated_update(M, None, f=f, f_state=s, bias_correction=bias_correction) for M, s in zip(Ms, states)]
        return SharedStep(updates, None, zero, zero)
    if R is None:
        raise ValueError(f"rotation policy {policy!r} needs the previous rotation R (got None)")
    # a diagonal-scaling f folds 1/max|Z| into its row scaling, which must not overflow for tiny
    # momenta: it sees the members divided by their largest entry (f is scale invariant), and
    # the cross-Gram reuses that division; the Adam projection's state needs the raw momenta
    scaled = _common_scale(Ms) if isinstance(f, DiagonalScaling) else None
    if refresh:
        Q, fallbacks, degenerate = new_rotation(
            Ms, R, policy=policy, f=f, f_states=states, bias_correction=bias_correction, estimator=estimator,
            qr=qr, shift=shift, cholqr2=cholqr2, matmul_dtype=matmul_dtype, scaled=scaled,
        )
    else:
        Q, fallbacks, degenerate = R, zero, zero
    # a lone member is divided by its own largest entry; members of a shared rotation only by their
    # common factor, which may leave one many orders below 1, so each is divided again by its own
    prescaled = scaled is not None and len(Ms) == 1
    updates = []
    for j, (M, s) in enumerate(zip(Ms, states)):
        U = rotated_update(scaled[j] if prescaled else M, Q, f=f, f_state=s, bias_correction=bias_correction,
                           matmul_dtype=matmul_dtype, prescaled=prescaled)
        if project_tall and M.shape[-1] < M.shape[-2]:
            U = project_onto_span(U, M)
        updates.append(U)
    return SharedStep(updates, Q, fallbacks, degenerate)


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
    r"""Per-matrix ARO: :math:`R_t = \mathrm{policy}(M_t, R_{t-1})`, :math:`U_t = R_t f(R_t^\top M_t)`.

    Args:
        M: ``(..., m, n)`` momentum (oriented: the rotation acts on the ``m`` rows).
        R: ``(..., m, m)`` previous rotations, or None for ``policy="identity"``.
        policy: one of :data:`ROTATION_POLICIES`.
        f: base projection (see :mod:`aro.functional.projections`).
        f_state: ``(..., m, n)`` second moment of the Adam projection (updated in place).
        bias_correction: ``(..., 1, 1)`` Adam bias correction :math:`1-\beta_2^t`.
        qr, shift, cholqr2: orthonormalization backend (see :mod:`aro.functional.qr`).
    """
    out = shared_rotated_step(
        [M], R, policy=policy, f=f, f_states=[f_state], bias_correction=bias_correction, project_tall=False,
        qr=qr, shift=shift, cholqr2=cholqr2,
    )
    return RotatedStep(out.updates[0], out.rotation, out.fallbacks, out.degenerate)
