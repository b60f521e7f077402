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
