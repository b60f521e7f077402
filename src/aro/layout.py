r"""How a parameter tensor is seen as a batch of matrices, and which side is rotated.

* a 2-D parameter ``(m, n)`` is one matrix;
* a 3-D parameter ``(E, m, n)`` (MoE experts, stacked heads) is a batch of ``E`` matrices,
  each with its own rotation, unless its group says ``matrix_view="flatten"``;
* a parameter with 4 or more dimensions (convolution weights ``(out, in, *kernel)``), or any
  parameter in a group with ``matrix_view="flatten"``, is flattened to ``(out, in * prod(kernel))``.

Orientation (the paper's Design 3, §6): the rotation :math:`R` acts on the rows of the *oriented* matrix.
``"rows"`` keeps ``(m, n)``; ``"cols"`` transposes to ``(n, m)``; ``"auto"`` rotates the
smaller side, so a rotation is never larger than the rank of the matrix it rotates (the
tall-matrix hazard: a rotation larger than the rank has columns that span only noise, and
Sinkhorn or row-norm would blow that noise up to full size).
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

__all__ = ["MATRIX_VIEWS", "ORIENTATIONS", "MatrixShape", "matrix_shape", "oriented", "oriented_matrix", "unoriented",
           "unoriented_matrix"]

ORIENTATIONS = ("auto", "rows", "cols")
MATRIX_VIEWS = ("auto", "flatten")


class MatrixShape(NamedTuple):
    """Batch count and oriented matrix size of one parameter."""

    count: int  # number of matrices (E for experts, else 1)
    m: int  # rotated side
    n: int  # other side
    transposed: bool  # True when the parameter's last two dims are (n, m)


def _raw_shape(shape: tuple[int, ...], matrix_view: str) -> tuple[int, int, int]:
    if len(shape) == 2:
        return 1, shape[0], shape[1]
    if len(shape) == 3 and matrix_view == "auto":
        return shape[0], shape[1], shape[2]
    rest = 1
    for s in shape[1:]:
        rest *= s
    return 1, shape[0], rest


def resolve_orientation(shape: tuple[int, ...], orientation: str, matrix_view: str = "auto") -> str:
    """``"rows"`` or ``"cols"`` for ``orientation`` in :data:`ORIENTATIONS`."""
    if orientation != "auto":
        return orientation
    _, m, n = _raw_shape(shape, matrix_view)
    return "rows" if m <= n else "cols"


def matrix_shape(shape: tuple[int, ...], orientation: str, matrix_view: str = "auto") -> MatrixShape:
    """The batch of matrices a parameter of ``shape`` is, under a resolved orientation."""
    count, m, n = _raw_shape(tuple(shape), matrix_view)
    if orientation == "cols":
        return MatrixShape(count, n, m, True)
    return MatrixShape(count, m, n, False)


def oriented(t: Tensor, ms: MatrixShape) -> Tensor:
    """View (or, for flattened/non-contiguous tensors, copy) ``t`` as ``(count, m, n)``."""
    m0, n0 = (ms.n, ms.m) if ms.transposed else (ms.m, ms.n)
    X = t.reshape(ms.count, m0, n0)
    return X.mT if ms.transposed else X


def unoriented(X: Tensor, ms: MatrixShape, shape: tuple[int, ...]) -> Tensor:
    """Inverse of :func:`oriented`: ``(count, m, n)`` back to the parameter's ``shape``."""
    return (X.mT if ms.transposed else X).reshape(shape)


def oriented_matrix(t: Tensor, ms: MatrixShape, index: int | None) -> Tensor:
    """Matrix ``index`` of :func:`oriented` (``None``: the only one), ``(m, n)``.

    A 2-D parameter is viewed directly (at most a transpose): the step views every member's
    tensors this way, and the general reshape-and-select costs two more dispatches each."""
    if index is None and t.ndim == 2:
        return t.mT if ms.transposed else t
    X = oriented(t, ms)
    return X[0] if index is None else X[index]


def unoriented_matrix(U: Tensor, ms: MatrixShape, shape: tuple[int, ...]) -> Tensor:
    """Inverse of :func:`oriented_matrix` for a parameter of ``shape`` that is one matrix."""
    if len(shape) == 2:
        return U.mT if ms.transposed else U
    return unoriented(U.unsqueeze(0), ms, shape)
