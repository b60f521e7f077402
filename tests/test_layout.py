"""aro.layout: the per-matrix views the step uses agree with the batched ones."""

from __future__ import annotations

import pytest
import torch

from aro.layout import matrix_shape, oriented, oriented_matrix, resolve_orientation, unoriented, unoriented_matrix

SHAPES = [((3, 5), "auto"), ((5, 3), "auto"), ((4, 4), "cols"), ((2, 3, 5), "auto"), ((6, 2, 3, 3), "auto"),
          ((2, 3, 5), "flatten")]


@pytest.mark.parametrize("shape,view", SHAPES)
@pytest.mark.parametrize("orientation", ["rows", "cols", "auto"])
def test_one_matrix_views_equal_the_batched_views_and_write_through(shape, view, orientation):
    t = torch.randn(shape, dtype=torch.float64)
    ms = matrix_shape(shape, resolve_orientation(shape, orientation, view), view)
    batch = oriented(t, ms)
    for i in [None] if ms.count == 1 else range(ms.count):
        X = oriented_matrix(t, ms, i)
        assert torch.equal(X, batch[0 if i is None else i])
    if ms.count == 1:
        U = torch.randn(ms.m, ms.n, dtype=torch.float64)
        assert torch.equal(unoriented_matrix(U, ms, shape), unoriented(U.unsqueeze(0), ms, shape))
        assert torch.equal(oriented_matrix(unoriented_matrix(U, ms, shape), ms, None), U)
    if len(shape) <= 3:  # a 2-D parameter and an expert of a 3-D one are views: writes reach the tensor
        last = None if ms.count == 1 else ms.count - 1
        oriented_matrix(t, ms, last).fill_(7.0)
        assert bool((t == 7.0).all()) if last is None else bool((t[last] == 7.0).all() and (t[0] != 7.0).all())
