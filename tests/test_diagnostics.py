"""The rotation objective, the eigen-rotation property of Figure 2, and read-only telemetry."""

import json
from functools import partial

import pytest
import torch
from torch import nn

import aro
from aro.diagnostics import cosine, exact_eigen_rotation, orthogonality_error, relative_gain, rotation_objective
from aro.functional.projections import row_norm, sign, sinkhorn
from aro.functional.qr import householder_qr


@pytest.mark.parametrize("f", [sinkhorn, sign, row_norm])
def test_objective_equals_the_direct_formula(f):
    g = torch.Generator().manual_seed(0)
    M = torch.randn(3, 5, 7, generator=g, dtype=torch.float64)
    R = householder_qr(torch.randn(3, 5, 5, generator=g, dtype=torch.float64))
    J = rotation_objective(M, R, f)
    for b in range(3):
        U = R[b] @ f(R[b].T @ M[b])
        assert J[b].item() == pytest.approx(torch.trace(M[b].T @ U).item(), rel=1e-12)
    assert torch.allclose(rotation_objective(M, None, f), rotation_objective(M, torch.eye(5, dtype=torch.float64), f))


def test_objective_of_sign_is_the_l1_norm_of_the_rotated_momentum():
    M = torch.randn(4, 6, dtype=torch.float64)
    R = householder_qr(torch.randn(4, 4, dtype=torch.float64))
    X = R.T @ M
    # sign(X) has RMS 1 already, so J = <X, sign X> = ||X||_1
    assert rotation_objective(M, R, sign).item() == pytest.approx(X.abs().sum().item(), rel=1e-12)


def test_relative_gain_of_the_eigen_rotation_is_zero_and_helpers():
    M = torch.randn(6, 9, dtype=torch.float64)
    E = exact_eigen_rotation(M)
    assert abs(relative_gain(M, E, sinkhorn).item()) < 1e-12
    assert orthogonality_error(E).item() < 1e-12
    lam = torch.linalg.eigvalsh(M @ M.T).flip(0)
    torch.testing.assert_close(torch.diag(E.T @ M @ M.T @ E), lam)
    assert cosine(M, 2 * M).item() == pytest.approx(1.0)
    assert cosine(M, torch.zeros_like(M)).item() == 0.0


@pytest.mark.parametrize("n", [8, 32])
def test_eigen_sinkhorn_update_of_a_square_gradient_is_orthogonal(n):
    # with R the exact eigenvectors of G G^T, R^T G = S V^T has orthogonal rows of norms s_i;
    # Sinkhorn balances it to sqrt(n) V^T: the update R f(R^T G) = sqrt(n) U V^T (all singular values equal)
    G = torch.randn(n, n, dtype=torch.float64)
    E = exact_eigen_rotation(G)
    U = E @ partial(sinkhorn, num_iters=50)(E.T @ G)
    s = torch.linalg.svdvals(U)
    assert (s.max() - s.min()).item() / s.max().item() < 1e-4


def _train(telemetry_path=None, every=1, steps=5, **kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = aro.ARO(aro.param_groups(model, mode="full"), lr=0.02, **kw)  # the output layer on ARO too
    tele = aro.Telemetry(opt, telemetry_path, every=every) if telemetry_path else None
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(32, 8, generator=g)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    if tele:
        tele.close()
    return model, opt


@pytest.mark.parametrize("base", ["sinkhorn", "adam"])
def test_telemetry_changes_no_number_and_logs_every_kth_step(tmp_path, base):
    plain, opt_plain = _train(base=base)
    logged, opt_logged = _train(tmp_path / "t.jsonl", every=2, base=base)
    for p, q in zip(plain.parameters(), logged.parameters()):
        assert torch.equal(p, q)
    for k, st in opt_plain.state_dict()["state"].items():
        for key, v in st.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, opt_logged.state_dict()["state"][k][key])
    lines = [json.loads(x) for x in (tmp_path / "t.jsonl").read_text().splitlines()]
    matrix = [x for x in lines if "param" in x]
    assert sorted({x["step"] for x in lines}) == [2, 4]
    assert {x["param"] for x in matrix} == {"0.weight", "2.weight"}
    for x in matrix:
        assert x["update_rms"] == pytest.approx(0.2, rel=1e-4)  # the RMS-matched update, recovered from W
        assert x["orth_error"] < 1e-5 and x["drift"] >= 0 and x["cos_update_momentum"] > 0
        assert (x["gain"] is None) == (base == "adam")
    # detached: later steps write nothing
    size = (tmp_path / "t.jsonl").stat().st_size
    for p in logged.parameters():
        p.grad = torch.randn_like(p)
    opt_logged.step()
    assert (tmp_path / "t.jsonl").stat().st_size == size


def test_telemetry_rejects_a_bad_period(tmp_path):
    opt = aro.ARO([nn.Parameter(torch.randn(3, 3))])
    with pytest.raises(ValueError, match="every"):
        aro.Telemetry(opt, tmp_path / "t.jsonl", every=0)
