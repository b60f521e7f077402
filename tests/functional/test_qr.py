import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from aro.functional.qr import (DEFAULT_SHIFT, MAX_FIRST_PASS_ERROR, _cholesky_qr_pass, householder_qr, orthonormalize,
                               shifted_cholesky_qr)


def orth_err(Q):
    eye = torch.eye(Q.shape[-1], dtype=Q.dtype)
    return (Q.mT @ Q - eye).abs().amax().item()


def test_householder_sign_convention_and_reconstruction():
    A = torch.randn(3, 8, 8, dtype=torch.float64)
    Q = householder_qr(A)
    T = Q.mT @ A
    assert (torch.diagonal(T, dim1=-2, dim2=-1) >= 0).all()
    torch.testing.assert_close(torch.triu(T), T, atol=1e-12, rtol=0)  # Q^T A upper triangular
    assert orth_err(Q) < 1e-12


@pytest.mark.parametrize("cond", [1.0, 1e2, 1e4])
def test_shifted_cholesky_matches_householder(cond):
    m = 32
    U = householder_qr(torch.randn(m, m, dtype=torch.float64))
    V = householder_qr(torch.randn(m, m, dtype=torch.float64))
    s = torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), m, dtype=torch.float64)
    A = (U * s) @ V.T
    Q, ok = shifted_cholesky_qr(A.float())
    assert ok.item()
    assert orth_err(Q) < 2e-6
    torch.testing.assert_close(Q.double(), householder_qr(A), atol=1e-3 * cond**0.5, rtol=0)


@pytest.mark.parametrize("method", ["householder", "shifted_cholesky", "polar"])
def test_degenerate_input_keeps_previous_rotation(method):
    prev = householder_qr(torch.randn(4, 6, 6))
    A = torch.randn(4, 6, 6)
    A[1] = 0.0
    A[2, 0, 0] = float("nan")
    A[3, 1, 1] = float("inf")
    out = orthonormalize(A, prev, method=method)
    assert torch.equal(out.Q[1:], prev[1:])
    assert int(out.degenerate) == 3
    assert orth_err(out.Q[0]) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rank_deficient_cross_gram(dtype):
    # A of rank 2 (a low-rank momentum): both backends return an orthogonal rotation whose
    # signal columns span col(A), shifted Cholesky needs no fallback (warm start), and the
    # two backends agree on the signal subspace.
    prev = householder_qr(torch.randn(3, 16, 16, dtype=torch.float64))
    B = torch.randn(3, 16, 2, dtype=torch.float64)
    A = (B @ B.mT @ prev).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    hh = orthonormalize(A, prev.to(dtype), method="householder").Q
    sc = orthonormalize(A, prev.to(dtype), method="shifted_cholesky")
    assert int(sc.fallbacks) == 0
    for Q in (hh, sc.Q):
        assert orth_err(Q) < tol
        basis = householder_qr(B.to(dtype))[..., :2]
        proj = basis @ basis.mT
        torch.testing.assert_close(proj @ Q[..., :2], Q[..., :2], atol=1e3 * tol, rtol=0)
    torch.testing.assert_close(hh[..., :2], sc.Q[..., :2], atol=1e3 * tol, rtol=0)


def test_shifted_cholesky_falls_back_and_counts():
    # exactly singular and huge dynamic range: Cholesky breaks down, Householder takes over
    A = torch.zeros(2, 5, 5)
    A[0] = torch.randn(5, 5)
    A[1, 0, 0] = 1.0
    A[1, 1, 1] = 1e-30
    prev = torch.eye(5).expand(2, 5, 5).clone()
    out = orthonormalize(A, prev, method="shifted_cholesky")
    assert orth_err(out.Q) < 1e-5
    assert int(out.fallbacks) >= 0  # counted (may be 0 thanks to the warm start)
    assert torch.isfinite(out.Q).all()


@given(
    m=st.integers(2, 40),
    log_scale=st.floats(-8, 4),
    rank=st.integers(1, 40),
    method=st.sampled_from(["householder", "shifted_cholesky"]),
    seed=st.integers(0, 2**16),
)
def test_rotations_orthogonal_across_scales(m, log_scale, rank, method, seed):
    g = torch.Generator().manual_seed(seed)
    rank = min(rank, m)
    A = (torch.randn(m, rank, generator=g) @ torch.randn(rank, m, generator=g)) * 10.0**log_scale
    prev = householder_qr(torch.randn(m, m, generator=g))
    Q = orthonormalize(A, prev, method=method).Q
    assert torch.isfinite(Q).all()
    assert orth_err(Q) <= 1e-5


def test_a_matrix_is_orthonormalized_the_same_whatever_shares_its_batch():
    """The repair pass runs only for the matrices that need it: a well-conditioned matrix
    batched with an ill-conditioned one gets the result it gets alone (the sharded optimizer
    steps a bucket's matrices on different ranks, and must equal one process)."""
    g = torch.Generator().manual_seed(3)
    U, _ = torch.linalg.qr(torch.randn(48, 48, generator=g))
    V, _ = torch.linalg.qr(torch.randn(48, 48, generator=g))
    ill = (U * torch.logspace(0, -6, 48)) @ V.T  # float32: past what one shifted pass repairs
    well = (V * torch.linspace(1, 2, 48)) @ U.T
    alone, _ = shifted_cholesky_qr(well)
    batched, _ = shifted_cholesky_qr(torch.stack([ill, well]))
    first_pass, _ = _cholesky_qr_pass(torch.stack([ill, well]) / torch.stack([ill, well]).norm(dim=(-2, -1), keepdim=True),
                                      DEFAULT_SHIFT * torch.finfo(torch.float32).eps / 2)
    gram_error = torch.linalg.matrix_norm(first_pass.mT @ first_pass - torch.eye(48))
    assert gram_error[0] > MAX_FIRST_PASS_ERROR >= gram_error[1]  # only the first needs the repair pass
    assert torch.equal(batched[1], alone)
