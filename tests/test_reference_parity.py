"""The batched optimizer against the float64 loop-per-matrix oracle in tests/aro_oracle.py."""

import numpy as np
import pytest
import torch

import aro
from aro_oracle import ReferenceARO

# square, wide, tall, two of the same shape (batched together), a 3-D batch, and a vector
SHAPES = [(12, 12), (10, 16), (16, 10), (16, 10), (3, 8, 12), (7,)]

# Parity is only meaningful where the math determines the result. Two cases where it does not:
# * ARO-Sign on a square matrix: after the first step R^T M has exact zeros (cofactors of a
#   +-1 matrix) and sign(R^T M) is often singular, so the next cross-Gram is rank-deficient and
#   its null-space columns come from rounding. Square ARO-Sign is compared for one step only.
# * orientation overrides that rotate the larger side: the cross-Gram has rank < m (the
#   tall-matrix hazard), same story. Overrides are compared on shapes where they are full rank.
BASES = [
    ("sinkhorn", {}),
    ("sinkhorn", {"sinkhorn_variant": "alternating", "sinkhorn_iters": 3}),
    ("sign", {}),
    ("row_norm", {}),
    ("adam", {}),
    ("identity", {}),
]
POLICIES = ["aro", "eigen", "eigen_exact", "polar", "identity"]


def run_both(base, extra, policy, steps=4, shapes=SHAPES, **kw):
    rng = np.random.default_rng(0)
    init = [rng.standard_normal(s) for s in shapes]
    grads = [[rng.standard_normal(s) for s in shapes] for _ in range(steps)]
    params = [torch.nn.Parameter(torch.tensor(w)) for w in init]
    opt = aro.ARO(params, lr=0.05, weight_decay=0.1, base=base, rotation=policy, **extra, **kw)
    ref_kw = {k: v for k, v in {**extra, **kw}.items()}
    reference = ReferenceARO(lr=0.05, weight_decay=0.1, base=base, rotation=policy, **ref_kw)
    ref_params = [w.copy() for w in init if w.ndim >= 2]
    for g in grads:
        for p, gi in zip(params, g):
            p.grad = torch.tensor(gi)
        opt.step()
        reference.step(ref_params, [gi for gi in g if gi.ndim >= 2])
    return opt, params, reference, ref_params


def rel(a, b):
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("base,extra", BASES, ids=lambda x: x if isinstance(x, str) else "-".join(map(str, x.values())))
def test_batched_equals_reference(base, extra, policy):
    if base == "sign" and policy == "aro":
        check_parity(*run_both(base, extra, policy, steps=1))
        check_parity(*run_both(base, extra, policy, shapes=[s for s in SHAPES if len(set(s)) > 1]))
    else:
        check_parity(*run_both(base, extra, policy))


def check_parity(opt, params, reference, ref_params):
    base, policy = opt.defaults["base"], opt.defaults["rotation"]
    matrices = [p for p in params if p.ndim >= 2]
    for k, (p, w) in enumerate(zip(matrices, ref_params)):
        assert rel(p.detach().numpy(), w) < 1e-10, (k, p.shape)
        st = opt.state[p]
        ref_st = reference.states[k]
        assert rel(st["momentum_buffer"].numpy().reshape(ref_st.M.shape), ref_st.M) < 1e-10
        if policy != "identity":
            R = st["rotation"].numpy().reshape(-1, *st["rotation"].shape[-2:])
            for e in range(R.shape[0]):
                assert rel(R[e], reference.rotations[(k, e)]) < 1e-10
        if base == "adam":
            V = st["exp_avg_sq"].numpy().reshape(len(ref_st.V), *ref_st.V[0].shape)
            for e in range(V.shape[0]):
                assert rel(V[e], ref_st.V[e]) < 1e-10


@pytest.mark.parametrize(
    "kw,shapes",
    [
        ({"nesterov": False}, SHAPES),
        ({"rms_target": None}, SHAPES),
        ({"orientation": "rows"}, [(12, 12), (10, 16), (3, 8, 12)]),
        ({"orientation": "cols"}, [(12, 12), (16, 10), (3, 12, 8)]),
    ],
)
def test_options_equal_reference(kw, shapes):
    check_parity(*run_both("sinkhorn", {}, "aro", shapes=shapes, **kw))


def test_orientation_override_is_stored_and_sizes_the_rotation():
    p = torch.nn.Parameter(torch.randn(4, 9))
    opt = aro.ARO([p], orientation="cols")
    p.grad = torch.randn(4, 9)
    opt.step()
    assert opt.state[p]["orientation"] == "cols"
    assert opt.state[p]["rotation"].shape == (9, 9)


# Not sign: ARO-Sign's rotated momentum has entries at rounding level (cofactors of a +-1 matrix),
# whose sign the two computations legitimately round differently; the oracle test covers sign.
@pytest.mark.parametrize("base", ["sinkhorn", "row_norm", "identity"])
def test_the_batched_folded_optimizer_equals_the_readable_reference(base):
    """aro.ARO (buckets, folded diagonal scalings, warm-started QR, orientation) against
    aro.functional.reference.aro_update, matrix by matrix, three steps in float64."""
    from aro.functional.projections import make_projection
    from aro.functional.reference import aro_update

    torch.manual_seed(0)
    shapes = [(6, 9), (6, 9), (5, 7), (12, 4)]  # two share a bucket; the last is tall: rotated on its columns
    params = [torch.nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in shapes]
    opt = aro.ARO(params, lr=0.05, weight_decay=0.1, base=base, nesterov=False)
    f = make_projection(base)
    W = [p.detach().clone() for p in params]
    M = [torch.zeros_like(w) for w in W]
    R = [torch.eye(min(s), dtype=torch.float64) for s in shapes]
    for _ in range(3):
        grads = [torch.randn(s, dtype=torch.float64) for s in shapes]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for k, g in enumerate(grads):
            M[k] = 0.95 * M[k] + 0.05 * g
            tall = shapes[k][0] > shapes[k][1]
            U, R[k] = aro_update(M[k].T if tall else M[k], R[k], f)
            W[k] = (1 - 0.05 * 0.1) * W[k] - 0.05 * (U.T if tall else U)
    for p, w, r in zip(params, W, R):
        torch.testing.assert_close(p.detach(), w, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(opt.state[p]["rotation"], r, rtol=1e-9, atol=1e-10)


def test_a_projection_registered_in_one_place_runs_and_matches_the_reference(monkeypatch):
    """README "Extending aro": adding f to STATELESS_PROJECTIONS is all aro.ARO needs."""
    from aro.functional import projections
    from aro.functional.numerics import rms_normalize, unit_scale
    from aro.functional.reference import aro_update

    def col_norm(X):
        X = unit_scale(X)
        return rms_normalize(X / torch.linalg.vector_norm(X, dim=-2, keepdim=True).clamp_min(1e-8))

    with pytest.raises(ValueError, match="base"):
        aro.ARO([torch.nn.Parameter(torch.randn(4, 6))], base="col_norm")
    monkeypatch.setitem(projections.STATELESS_PROJECTIONS, "col_norm", col_norm)
    torch.manual_seed(1)
    p = torch.nn.Parameter(torch.randn(5, 8, dtype=torch.float64))
    W0 = p.detach().clone()
    opt = aro.ARO([p], lr=0.1, weight_decay=0.0, base="col_norm", nesterov=False)
    p.grad = torch.randn(5, 8, dtype=torch.float64)
    opt.step()
    U, R = aro_update(0.05 * p.grad, torch.eye(5, dtype=torch.float64), col_norm)
    torch.testing.assert_close(p.detach(), W0 - 0.1 * U, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(opt.state[p]["rotation"], R, rtol=1e-9, atol=1e-10)
