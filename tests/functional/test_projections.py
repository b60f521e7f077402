import math
from functools import partial

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import aro_oracle as ref
from aro.functional.projections import AdamProjection, identity, make_projection, row_norm, sign, sinkhorn

STATELESS = {
    "sinkhorn": sinkhorn,
    "sinkhorn_alt": partial(sinkhorn, variant="alternating"),
    "sign": sign,
    "row_norm": row_norm,
    "identity": identity,
}


def rms(X):
    return X.square().mean(dim=(-2, -1)).sqrt()


@pytest.mark.parametrize("name", list(STATELESS))
@pytest.mark.parametrize("shape", [(5, 5), (4, 9), (9, 4), (3, 4, 6)])
def test_rms_one_scale_invariant_and_batched(name, shape):
    f = STATELESS[name]
    X = torch.randn(shape, dtype=torch.float64)
    Y = f(X)
    assert Y.shape == X.shape
    torch.testing.assert_close(rms(Y), torch.ones_like(rms(Y)), rtol=1e-12, atol=0)
    torch.testing.assert_close(f(X * 1e-20), Y, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(f(X * 1e20), Y, rtol=1e-10, atol=1e-12)
    if X.ndim == 3:  # batching = independent matrices
        for k in range(X.shape[0]):
            torch.testing.assert_close(f(X[k]), Y[k], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", list(STATELESS))
def test_signed_permutation_equivariance(name):
    f = STATELESS[name]
    X = torch.randn(6, 9, dtype=torch.float64)
    P = torch.eye(6, dtype=torch.float64)[torch.randperm(6)] * torch.tensor([1, -1, 1, -1, -1, 1.0])[:, None]
    torch.testing.assert_close(f(P @ X), P @ f(X), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", list(STATELESS))
def test_zero_input_gives_zero(name):
    X = torch.zeros(4, 7)
    assert torch.equal(STATELESS[name](X), X)


@pytest.mark.parametrize("variant", ["simultaneous", "alternating"])
@pytest.mark.parametrize("shape", [(6, 6), (5, 11), (11, 5)])
def test_sinkhorn_matches_naive_reference(variant, shape):
    X = torch.randn(shape, dtype=torch.float64)
    for K in (1, 2, 5):
        expected = ref.sinkhorn(X.numpy(), K, variant)
        torch.testing.assert_close(sinkhorn(X, num_iters=K, variant=variant), torch.from_numpy(expected), rtol=1e-12, atol=1e-12)


def test_sinkhorn_variants_agree_at_five_iterations():
    # simultaneous vs alternating Sinkhorn (the paper's §3): cosine > 0.9999 at K = 5 on random matrices
    X = torch.randn(64, 128, dtype=torch.float64)
    a = sinkhorn(X, num_iters=5, variant="simultaneous")
    b = sinkhorn(X, num_iters=5, variant="alternating")
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.9999


@given(
    m=st.integers(2, 24),
    n=st.integers(2, 24),
    log_scale=st.floats(-8, 4),
    seed=st.integers(0, 2**16),
)
def test_sinkhorn_row_and_column_norms_converge(m, n, log_scale, seed):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(m, n, generator=g) * 10.0**log_scale
    errs = []
    for K in (1, 5, 30):
        Y = sinkhorn(X, num_iters=K, variant="alternating").double()
        rows, cols = Y.norm(dim=1) / math.sqrt(n), Y.norm(dim=0) / math.sqrt(m)
        errs.append(max((rows - 1).abs().max().item(), (cols - 1).abs().max().item()))
    assert errs[2] <= errs[0] + 1e-6
    assert errs[2] < 1e-2


def test_row_norm_rows_equal():
    Y = row_norm(torch.randn(7, 13, dtype=torch.float64))
    torch.testing.assert_close(Y.norm(dim=1), torch.full((7,), math.sqrt(13.0), dtype=torch.float64))


def test_sign_values():
    X = torch.tensor([[1.0, -2.0], [3.0, -4.0]])
    torch.testing.assert_close(sign(X), torch.tensor([[1.0, -1.0], [1.0, -1.0]]))


def test_adam_lookahead_leaves_state_and_project_updates_it():
    f = AdamProjection(beta2=0.9, eps=1e-8)
    Z = torch.randn(4, 6, dtype=torch.float64)
    V = torch.rand(4, 6, dtype=torch.float64)
    V0 = V.clone()
    bc = torch.tensor(1 - 0.9**3, dtype=torch.float64)
    D_look = f.lookahead(Z, V, bc)
    assert torch.equal(V, V0)  # scratch second moment, not stored
    D = f.project_(Z, V, bc)
    expected_V = 0.9 * V0 + 0.1 * Z * Z
    torch.testing.assert_close(V, expected_V)
    expected_D = Z / ((expected_V / bc).sqrt() + 1e-8)
    expected_D = expected_D / expected_D.square().mean().sqrt()
    torch.testing.assert_close(D, expected_D)
    torch.testing.assert_close(D_look, expected_D)  # same inputs -> same direction


def test_adam_second_moment_saturates_instead_of_overflowing():
    f = AdamProjection()
    Z = torch.full((3, 3), 1e30)
    V = torch.zeros(3, 3)
    D = f.project_(Z, V, torch.tensor(1.0))
    assert torch.isfinite(V).all() and torch.isfinite(D).all()


def test_make_projection_rejects_unknown_name():
    with pytest.raises(ValueError, match="base projection"):
        make_projection("muon")


def test_newton_schulz_is_close_to_polar_and_equivariant():
    from aro.functional.projections import newton_schulz
    from aro.functional.qr import householder_qr, polar

    X = torch.randn(2, 16, 40, dtype=torch.float64)
    Y = newton_schulz(X)
    cos = torch.nn.functional.cosine_similarity(Y.flatten(1), polar(X).flatten(1), dim=1)
    assert (cos > 0.95).all()  # Muon's NS5 lands near, not on, U V^T
    torch.testing.assert_close(rms(Y), torch.ones(2, dtype=torch.float64))
    Q = householder_qr(torch.randn(16, 16, dtype=torch.float64))
    torch.testing.assert_close(newton_schulz(Q @ X), Q @ Y, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(newton_schulz(X.mT), Y.mT, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("variant", ["simultaneous", "alternating"])
@pytest.mark.parametrize("shape", [(6, 6), (5, 11), (2, 11, 5)])
def test_sinkhorn_scalings_give_sinkhorn_and_their_rms_from_the_vectors(variant, shape):
    from aro.functional.projections import apply_scalings, sinkhorn_scalings

    X = torch.randn(shape, dtype=torch.float64) * 3.0
    a, b = sinkhorn_scalings(X, num_iters=5, variant=variant)
    assert a.shape == X.shape[:-1] and b.shape == X.shape[:-2] + X.shape[-1:]
    Y = apply_scalings(X, (a, b))
    torch.testing.assert_close(Y, sinkhorn(X, num_iters=5, variant=variant), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rms(Y), torch.ones_like(rms(Y)), rtol=1e-12, atol=0)  # RMS folded into a
    a0, b0 = sinkhorn_scalings(torch.zeros(4, 5))
    assert torch.equal(a0, torch.zeros(4)) and torch.isfinite(b0).all()


def test_row_norm_scalings_scale_rows_only():
    from aro.functional.projections import apply_scalings, row_norm_scalings

    X = torch.randn(3, 7, 9, dtype=torch.float64)
    a, b = row_norm_scalings(X)
    assert torch.equal(b, torch.ones(3, 9, dtype=torch.float64))
    torch.testing.assert_close(apply_scalings(X, (a, b)), row_norm(X), rtol=1e-12, atol=1e-12)


def test_amax_abs_matches_abs_amax_and_propagates_nan():
    from aro.functional.numerics import amax_abs

    X = torch.randn(4, 5, 6)
    torch.testing.assert_close(amax_abs(X), X.abs().amax(dim=(-2, -1), keepdim=True), rtol=0, atol=0)
    X[2, 1, 3] = float("nan")
    assert torch.isnan(amax_abs(X)[2]).all() and torch.isfinite(amax_abs(X)[[0, 1, 3]]).all()


def test_make_projection_returns_diagonal_scalings_for_sinkhorn_and_row_norm():
    from aro.functional.projections import DiagonalScaling

    X = torch.randn(2, 6, 10, dtype=torch.float64)
    for name, plain in (("sinkhorn", sinkhorn), ("row_norm", row_norm)):
        f = make_projection(name)
        assert isinstance(f, DiagonalScaling)
        torch.testing.assert_close(f(X), plain(X), rtol=1e-12, atol=1e-12)
    assert not isinstance(make_projection("sign"), DiagonalScaling)


@pytest.mark.parametrize("name", ["sinkhorn"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_bounded_scalings_equal_the_guarded_ones_on_the_rotated_steps_inputs(name, dtype):
    """The step calls ``of_bounded`` on R^T M with M divided by its largest entry: entries of any
    size down to 1/sqrt(mn) of the largest, rows of pure rounding noise, zero matrices."""
    from aro.functional.numerics import unit_scale
    from aro.functional.projections import apply_scalings
    from aro.functional.qr import householder_qr

    g = torch.Generator().manual_seed(3)
    f = make_projection(name)
    M = torch.randn(5, 16, 40, generator=g, dtype=torch.float64)
    M[1] *= 1e-30  # scale does not matter after unit_scale
    M[2] = torch.zeros(16, 40, dtype=torch.float64)
    M[2, 0, 0] = 1.0  # one entry: Z's largest entry is far below 1
    M[3, :, :] = M[3, :1, :] * torch.linspace(1, 2, 16, dtype=torch.float64)[:, None]  # rank 1: noise rows
    M[4] = 0.0
    R = householder_qr(torch.randn(5, 16, 16, generator=g, dtype=torch.float64))
    Z = (R.mT @ unit_scale(M)).to(dtype)
    assert float(Z.abs().max()) <= 16**0.5
    bounded, guarded = apply_scalings(Z, f.of_bounded(Z)), apply_scalings(Z, f.scalings(Z))
    # (a, b) themselves may differ by a factor c and 1/c (odd Sinkhorn iterations carry the scale of
    # the squares); D_a Z D_b, all the step uses, does not
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bounded, guarded, **tol)
    torch.testing.assert_close(rms(bounded[:4]), torch.ones(4, dtype=dtype), **tol)
    assert torch.equal(bounded[4], torch.zeros(16, 40, dtype=dtype))


def test_a_diagonal_scaling_without_a_bounded_variant_uses_its_scalings():
    from aro.functional.projections import DiagonalScaling, sinkhorn_scalings

    X = torch.randn(3, 6, 8, dtype=torch.float64)
    f = DiagonalScaling(sinkhorn_scalings)  # made by hand, as a user may
    assert f.bounded_scalings is None
    assert all(torch.equal(u, v) for u, v in zip(f.of_bounded(X), sinkhorn_scalings(X)))
    torch.testing.assert_close(f(X), sinkhorn(X), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("estimator", ["sum", "stack"])
@pytest.mark.parametrize("ratio", [1e-8, 1e-22])
def test_a_small_member_of_a_shared_rotation_gets_the_update_of_the_guarded_scalings(estimator, ratio):
    """Members of a shared rotation are divided by one common factor, so a member many orders
    smaller than another is not bounded: its Sinkhorn must divide by its own largest entry (the
    bounded shortcut would underflow its squares or hit the eps floor)."""
    from aro.functional.projections import DiagonalScaling
    from aro.functional.qr import householder_qr
    from aro.functional.rotation import shared_rotated_step

    g = torch.Generator().manual_seed(5)
    M1 = torch.randn(2, 32, 64, generator=g)
    M2 = torch.randn(2, 32, 48, generator=g) * ratio
    R = householder_qr(torch.randn(2, 32, 32, generator=g))
    f = make_projection("sinkhorn")
    guarded = DiagonalScaling(f.scalings)  # no bounded variant: every Z divided by its own largest entry
    got = shared_rotated_step([M1, M2], R, f=f, estimator=estimator)
    want = shared_rotated_step([M1, M2], R, f=guarded, estimator=estimator)
    torch.testing.assert_close(got.rotation, want.rotation, rtol=1e-4, atol=1e-5)
    for U, V in zip(got.updates, want.updates):
        torch.testing.assert_close(U, V, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(rms(U), torch.ones(2), rtol=1e-4, atol=0)
