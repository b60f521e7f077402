import math
from functools import partial

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from aro.functional.numerics import rms_normalize
from aro.functional.projections import AdamProjection, identity, row_norm, sign, sinkhorn
from aro.functional.qr import householder_qr, polar
from aro.functional.rotation import eigen_rotation, new_rotation, rotated_step, rotated_update


def orth_err(Q):
    return (Q.mT @ Q - torch.eye(Q.shape[-1], dtype=Q.dtype)).abs().amax().item()


def spectrum_matrix(m, n, ratio=0.8, dtype=torch.float64):
    """M = U diag(s) V^T with geometric singular values (clear gaps, fast power iteration)."""
    U = householder_qr(torch.randn(m, m, dtype=dtype))
    V = householder_qr(torch.randn(n, n, dtype=dtype))[:, :m]
    s = ratio ** torch.arange(m, dtype=dtype)
    return (U * s) @ V.T, U, V


def test_row_norm_aro_converges_to_muon_direction():
    # row-norm ARO is a power iteration (the paper's §3): iterating R on a fixed M gives sqrt(n) U V^T (Muon's direction, RMS 1)
    m, n = 12, 40
    M, U, V = spectrum_matrix(m, n)
    R = torch.eye(m, dtype=torch.float64)
    for _ in range(200):
        out = rotated_step(M, R, policy="aro", f=row_norm)
        R = out.rotation
    target = math.sqrt(n) * U @ V.T
    rel = (out.update - target).norm() / target.norm()
    assert rel < 1e-6


def test_row_norm_aro_step_equals_power_iteration():
    # QR(M f_RN(R^T M)^T) = QR(M M^T R): one ARO row-norm step is one eigen step
    M = torch.randn(10, 30, dtype=torch.float64)
    R = householder_qr(torch.randn(10, 10, dtype=torch.float64))
    a = new_rotation(M, R, policy="aro", f=row_norm).Q
    b = new_rotation(M, R, policy="eigen", f=row_norm).Q
    torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_identity_f_is_eigen_power_iteration_and_converges_to_eigh():
    M, U, _ = spectrum_matrix(8, 20)
    R = householder_qr(torch.randn(8, 8, dtype=torch.float64))
    a = new_rotation(M, R, policy="aro", f=identity).Q
    b = new_rotation(M, R, policy="eigen", f=identity).Q
    torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    for _ in range(300):
        R = new_rotation(M, R, policy="eigen", f=identity).Q
    exact = eigen_rotation(M, R).Q
    torch.testing.assert_close(R.abs(), exact.abs(), rtol=0, atol=1e-8)  # equal up to column signs


def test_polar_f_makes_rotation_irrelevant():
    # a rotation-equivariant f: R f(R^T M) = f(M) for every R, so ARO + Polar = Muon
    def f_polar(X):
        return rms_normalize(polar(X))

    M = torch.randn(6, 15, dtype=torch.float64)
    expected = f_polar(M)
    for _ in range(4):
        R = householder_qr(torch.randn(6, 6, dtype=torch.float64))
        torch.testing.assert_close(rotated_update(M, R, f=f_polar), expected, rtol=0, atol=1e-10)
        torch.testing.assert_close(rotated_step(M, R, policy="aro", f=f_polar).update, expected, rtol=0, atol=1e-10)


def test_eigen_exact_orders_and_signs():
    M, U, _ = spectrum_matrix(5, 9)
    Q = eigen_rotation(M, torch.eye(5, dtype=torch.float64)).Q
    torch.testing.assert_close(Q.abs(), U.abs(), rtol=0, atol=1e-10)
    pivots = Q.gather(0, Q.abs().argmax(dim=0, keepdim=True))
    assert (pivots > 0).all()


PROJ = {"sinkhorn": sinkhorn, "sinkhorn_alt": partial(sinkhorn, variant="alternating"), "sign": sign, "row_norm": row_norm}


@given(
    name=st.sampled_from(list(PROJ)),
    policy=st.sampled_from(["aro", "eigen", "polar"]),
    m=st.integers(2, 12),
    n=st.integers(2, 24),
    seed=st.integers(0, 2**16),
)
def test_column_sign_flips_of_R_leave_update_unchanged(name, policy, m, n, seed):
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(m, n, generator=g, dtype=torch.float64)
    R = householder_qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    D = torch.where(torch.rand(m, generator=g) < 0.5, -1.0, 1.0).to(torch.float64)
    f = PROJ[name]
    a = rotated_step(M, R, policy=policy, f=f).update
    b = rotated_step(M, R * D, policy=policy, f=f).update
    torch.testing.assert_close(a, b, rtol=0, atol=1e-9)


@given(
    log_scale=st.floats(-8, 4),
    m=st.integers(1, 24),
    n=st.integers(1, 48),
    policy=st.sampled_from(["aro", "eigen", "polar", "eigen_exact"]),
    qr=st.sampled_from(["householder", "shifted_cholesky"]),
    rank=st.integers(1, 24),
    seed=st.integers(0, 2**16),
)
def test_rotations_stay_orthogonal_across_gradient_scales(log_scale, m, n, policy, qr, rank, seed):
    g = torch.Generator().manual_seed(seed)
    rank = min(rank, m, n)
    R = torch.eye(m)
    for _ in range(3):  # a few steps from R_0 = I, new gradients each time
        M = torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g) * 10.0**log_scale
        out = rotated_step(M, R, policy=policy, f=sinkhorn, qr=qr)
        R = out.rotation
        assert R.dtype == torch.float32
        assert orth_err(R) <= 1e-5
        assert torch.isfinite(out.update).all()


def test_zero_momentum_keeps_rotation_and_gives_zero_update():
    R = householder_qr(torch.randn(2, 5, 5))
    out = rotated_step(torch.zeros(2, 5, 8), R, policy="aro", f=sinkhorn, qr="shifted_cholesky")
    assert torch.equal(out.rotation, R)
    assert torch.equal(out.update, torch.zeros(2, 5, 8))
    assert int(out.degenerate) == 2


def test_adam_projection_stores_only_new_frame_second_moment():
    f = AdamProjection(beta2=0.9)
    M = torch.randn(4, 7, dtype=torch.float64)
    R = householder_qr(torch.randn(4, 4, dtype=torch.float64))
    V = torch.rand(4, 7, dtype=torch.float64)
    V0 = V.clone()
    bc = torch.tensor(0.5, dtype=torch.float64)
    out = rotated_step(M, R, policy="aro", f=f, f_state=V, bias_correction=bc)
    Z = out.rotation.T @ M
    torch.testing.assert_close(V, 0.9 * V0 + 0.1 * Z * Z)  # V_t in the new frame, no V~ kept


def test_identity_policy_has_no_rotation():
    M = torch.randn(3, 5)
    out = rotated_step(M, None, policy="identity", f=sinkhorn)
    assert out.rotation is None
    torch.testing.assert_close(out.update, sinkhorn(M))


def test_unknown_policy_rejected():
    with pytest.raises(ValueError, match="rotation policy"):
        rotated_step(torch.randn(3, 3), torch.eye(3), policy="spin", f=sign)


@pytest.mark.parametrize("f", [sinkhorn, row_norm])
def test_null_directions_of_a_rank_deficient_momentum_stay_zero(f):
    # a softmax router's gradient has rows summing to zero; for 2 experts the rows are opposite,
    # so M is rank 1 and R^T M has a row of pure rounding noise that must not be blown up
    g = torch.randn(16)
    M = torch.stack([g, -g])
    R = torch.eye(2)
    for _ in range(3):
        out = rotated_step(M, R, policy="aro", f=f)
        R = out.rotation
    s = torch.linalg.svdvals(out.update)
    assert s[1] < 1e-5 * s[0]
    # the float64 version of the same step agrees: rounding noise does not decide the update
    out64 = rotated_step(M.double(), torch.eye(2, dtype=torch.float64), policy="aro", f=f)
    ref = rotated_step(M, torch.eye(2), policy="aro", f=f)
    # (float32 differs by the 100u warm-start perturbation of the rotation, ~6e-6 relative)
    torch.testing.assert_close(ref.update.double(), out64.update, atol=1e-4, rtol=0)


# --- diagonal-scaling fast path: f(X) = D_a X D_b folded into the products --------------------

DIAGONAL = {
    "sinkhorn": ("sinkhorn", {}, sinkhorn),
    "sinkhorn_alt": ("sinkhorn", {"sinkhorn_variant": "alternating"}, partial(sinkhorn, variant="alternating")),
    "sinkhorn_k2": ("sinkhorn", {"sinkhorn_iters": 2}, partial(sinkhorn, num_iters=2)),
    "row_norm": ("row_norm", {}, row_norm),
}


@pytest.mark.parametrize("name", list(DIAGONAL))
@pytest.mark.parametrize("policy", ["aro", "eigen", "polar"])
@pytest.mark.parametrize("members,estimator", [([(3, 6, 6)], "sum"), ([(2, 5, 11)], "sum"), ([(6, 9)], "sum"),
                                               ([(2, 6, 9), (2, 6, 14)], "sum"), ([(2, 6, 9), (2, 6, 14)], "stack"),
                                               ([(1, 8, 20), (1, 8, 3)], "sum")])
def test_diagonal_scaling_path_equals_materialized_f(name, policy, members, estimator):
    """The folded products (M D_b) Z^T D_a and (R D_a) Z D_b give what f(Z) written out gives."""
    from aro.functional.projections import DiagonalScaling, make_projection
    from aro.functional.rotation import shared_rotated_step

    base, options, plain = DIAGONAL[name]
    fast = make_projection(base, **options)
    assert isinstance(fast, DiagonalScaling) and not isinstance(plain, DiagonalScaling)
    g = torch.Generator().manual_seed(7)
    Ms = [torch.randn(shape, generator=g, dtype=torch.float64) * 10.0 ** (3 * j) for j, shape in enumerate(members)]
    d = members[0][-2]
    R = householder_qr(torch.randn(members[0][:-2] + (d, d), generator=g, dtype=torch.float64))
    for _ in range(3):  # a few steps, so R moves away from its start
        a = shared_rotated_step(Ms, R, policy=policy, f=fast, estimator=estimator)
        b = shared_rotated_step(Ms, R, policy=policy, f=plain, estimator=estimator)
        torch.testing.assert_close(a.rotation, b.rotation, rtol=1e-10, atol=1e-10)
        for Ua, Ub in zip(a.updates, b.updates):
            torch.testing.assert_close(Ua, Ub, rtol=1e-10, atol=1e-10)
        R = a.rotation


@pytest.mark.parametrize("scale", [1e-40, 1e-30, 1e-8, 1e30])
def test_diagonal_scaling_path_is_scale_invariant_without_overflow(scale):
    """a absorbs 1/max|Z|: the momenta are divided by their largest entry first, so float32
    momenta from subnormal to 1e30 give the same (finite) step."""
    from aro.functional.projections import make_projection
    from aro.functional.rotation import shared_rotated_step

    f = make_projection("sinkhorn")
    g = torch.Generator().manual_seed(3)
    M = torch.randn(2, 8, 24, generator=g)
    R = householder_qr(torch.randn(2, 8, 8, generator=g))
    ref = shared_rotated_step([M], R, f=f)
    out = shared_rotated_step([M * scale], R, f=f)
    assert torch.isfinite(out.updates[0]).all() and torch.isfinite(out.rotation).all()
    tol = 5e-3 if scale < 1e-38 else 1e-5  # subnormal inputs carry fewer significant bits
    torch.testing.assert_close(out.updates[0], ref.updates[0], rtol=tol, atol=tol)
    torch.testing.assert_close(out.rotation, ref.rotation, rtol=tol, atol=tol)
    U = rotated_update(M * scale, R, f=f)  # the public function scales by itself
    torch.testing.assert_close(U, rotated_update(M, R, f=f), rtol=tol, atol=tol)

