"""Dion's invariants (arXiv 2504.05295, Algorithm 1) in float64."""

import math

import pytest
import torch

from aro.bench.dion import Dion, dion_rank, dion_update, initial_factor

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("shape,fraction", [((12, 8), 0.25), ((8, 12), 0.5), ((3, 10, 6), 0.34), ((9, 9), 1.0)])
def test_update_has_rank_at_most_r_and_orthonormal_left_factor(shape, fraction):
    g = _gen(0)
    B = torch.randn(shape, generator=g, dtype=F64)
    r = dion_rank(shape, fraction)
    Q = torch.randn((*shape[:-2], shape[-1], r), generator=g, dtype=F64)
    P, update, _, Q_new = dion_update(B, Q, 0.95)
    assert P.shape[-1] == r and Q_new.shape == Q.shape
    eye = torch.eye(r, dtype=F64).expand(*shape[:-2], r, r)
    torch.testing.assert_close(P.mT @ P, eye, atol=1e-12, rtol=0)
    torch.testing.assert_close(Q_new.norm(dim=-2), torch.ones(*shape[:-2], r, dtype=F64), atol=1e-12, rtol=0)
    torch.testing.assert_close(update, P @ Q_new.mT, atol=1e-12, rtol=0)
    ranks = torch.linalg.matrix_rank(update)
    assert int(ranks.max()) <= r
    if r < min(shape[-2:]):
        assert int(ranks.min()) == r  # a generic B gives exactly rank r


@pytest.mark.parametrize("shape,fraction", [((12, 8), 0.25), ((8, 12), 0.5), ((9, 9), 1.0)])
def test_error_feedback_keeps_exactly_the_residual_not_applied(shape, fraction):
    g = _gen(1)
    B = torch.randn(shape, generator=g, dtype=F64)
    Q = torch.randn(shape[-1], dion_rank(shape, fraction), generator=g, dtype=F64)
    mu = 0.9
    P, _, M_new, _ = dion_update(B, Q, mu)
    applied = P @ P.mT @ B  # B projected on span(P): the part the update applies
    torch.testing.assert_close(M_new, (B - applied) + mu * applied, atol=1e-12, rtol=0)


@pytest.mark.parametrize("shape", [(10, 6), (6, 10), (7, 7)])
def test_full_rank_error_feedback_is_plain_momentum(shape):
    g = _gen(2)
    B = torch.randn(shape, generator=g, dtype=F64)
    Q = torch.randn(shape[-1], min(shape), generator=g, dtype=F64)
    _, _, M_new, _ = dion_update(B, Q, 0.95)
    torch.testing.assert_close(M_new, 0.95 * B, atol=1e-12, rtol=0)


@pytest.mark.parametrize("shape", [(10, 6), (6, 10), (7, 7)])
def test_full_rank_with_converged_factor_is_orthonormal_up_to_scale(shape):
    """Q aligned with B's right singular vectors: the update is U Vᵀ, Muon's direction."""
    g = _gen(3)
    B = torch.randn(shape, generator=g, dtype=F64)
    U, _, Vh = torch.linalg.svd(B, full_matrices=False)
    update = dion_update(B, Vh.mT.contiguous(), 0.95).update
    torch.testing.assert_close(torch.linalg.svdvals(update), torch.ones(min(shape), dtype=F64), atol=1e-10, rtol=0)
    torch.testing.assert_close(update, U @ Vh, atol=1e-10, rtol=0)


def test_full_rank_power_iteration_converges_to_orthonormal():
    """With a fixed buffer, repeated steps are subspace iteration: P Qᵀ tends to U Vᵀ."""
    g = _gen(4)
    U, _ = torch.linalg.qr(torch.randn(8, 5, generator=g, dtype=F64))
    V, _ = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=F64))
    B = U @ torch.diag(torch.tensor([5.0, 3.0, 2.0, 1.2, 0.5], dtype=F64)) @ V.mT
    Q = torch.randn(5, 5, generator=g, dtype=F64)
    for _ in range(200):
        step = dion_update(B, Q, 0.95)
        Q = step.Q
    torch.testing.assert_close(torch.linalg.svdvals(step.update), torch.ones(5, dtype=F64), atol=1e-8, rtol=0)


def test_optimizer_step_matches_the_algorithm():
    g = _gen(5)
    X0 = torch.randn(6, 4, generator=g, dtype=F64)
    p = torch.nn.Parameter(X0.clone())
    opt = Dion([p], lr=0.1, mu=0.9, rank_fraction=0.5, weight_decay=0.2, seed=7)
    Q0 = initial_factor((6, 4), 2, seed=7, index=0).to(F64)
    grads = [torch.randn(6, 4, generator=g, dtype=F64) for _ in range(3)]
    M, Q, X = torch.zeros_like(X0), Q0, X0.clone()
    for G in grads:
        p.grad = G.clone()
        opt.step()
        _, update, M, Q = dion_update(M + G, Q, 0.9)
        X = (1 - 0.1 * 0.2) * X - 0.1 * math.sqrt(6 / 4) * update
    torch.testing.assert_close(p.detach(), X, atol=1e-12, rtol=0)


def test_zero_gradient_keeps_the_factor():
    p = torch.nn.Parameter(torch.ones(5, 3, dtype=F64))
    opt = Dion([p], lr=0.1, rank_fraction=1.0)
    p.grad = torch.zeros_like(p)
    opt.step()
    Q = opt.state[p]["Q"].clone()
    assert torch.equal(p.detach(), torch.ones(5, 3, dtype=F64))
    assert torch.linalg.matrix_rank(Q) == 3
    p.grad = torch.randn(5, 3, generator=_gen(6), dtype=F64)
    opt.step()
    assert not torch.equal(p.detach(), torch.ones(5, 3, dtype=F64))


@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=-1.0), "lr"), (dict(lr=0.1, mu=1.0), "mu"), (dict(lr=0.1, rank_fraction=0.0), "rank_fraction"),
    (dict(lr=0.1, weight_decay=-0.1), "weight_decay"),
])
def test_bad_arguments_name_the_parameter(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Dion([torch.nn.Parameter(torch.zeros(3, 3))], **kwargs)


def test_vectors_are_refused():
    with pytest.raises(ValueError, match="matrices"):
        Dion([torch.nn.Parameter(torch.zeros(3))], lr=0.1)


def test_rms_target_matches_each_update():
    g = _gen(8)
    p = torch.nn.Parameter(torch.zeros(3, 12, 8, dtype=F64))  # a batch of three matrices
    opt = Dion([p], lr=0.5, rank_fraction=0.25, rms_target=0.2)
    p.grad = torch.randn(3, 12, 8, generator=g, dtype=F64)
    opt.step()
    rms = p.detach().square().mean(dim=(-2, -1)).sqrt()
    torch.testing.assert_close(rms, torch.full((3,), 0.5 * 0.2, dtype=F64), atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="rms_target"):
        Dion([p], lr=0.1, rms_target=0.0)


def test_state_saved_before_rms_target_existed_loads():
    p = torch.nn.Parameter(torch.randn(6, 4, generator=_gen(9), dtype=F64))
    opt = Dion([p], lr=0.1)
    p.grad = torch.randn(6, 4, generator=_gen(10), dtype=F64)
    opt.step()
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        del group["rms_target"]
    fresh = Dion([p], lr=0.1)
    fresh.load_state_dict(saved)
    assert fresh.param_groups[0]["rms_target"] is None
    fresh.step()


def test_initial_factor_depends_on_seed_and_index_only():
    a = [torch.nn.Parameter(torch.zeros(5, 3)) for _ in range(2)]
    b = [torch.nn.Parameter(torch.zeros(5, 3)) for _ in range(2)]
    opt_a, opt_b = Dion(a, lr=0.1, seed=3), Dion(b, lr=0.1, seed=3)
    g0, g1 = torch.randn(5, 3, generator=_gen(11)), torch.randn(5, 3, generator=_gen(12))
    a[0].grad, a[1].grad = g0, g1.clone()
    opt_a.step()
    b[1].grad = g1.clone()  # the second matrix stepped first (as after a resume)
    opt_b.step()
    assert torch.equal(opt_a.state[a[1]]["Q"], opt_b.state[b[1]]["Q"])
    assert torch.equal(a[1].detach(), b[1].detach())
    assert not torch.equal(initial_factor((5, 3), 1, 3, 0), initial_factor((5, 3), 1, 3, 1))
