"""The enumerated reliability cases of docs/RELIABILITY.md; each test name starts with its case id."""

import copy
import pickle
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import aro
from aro.functional.qr import householder_qr, orthonormalize


def finite_everywhere(opt, params):
    for p in params:
        assert torch.isfinite(p).all()
        for v in opt.state[p].values():
            if isinstance(v, torch.Tensor):
                assert torch.isfinite(v).all()


def orth_err(R):
    R = R.reshape(-1, *R.shape[-2:]).double()
    return (R.mT @ R - torch.eye(R.shape[-1], dtype=R.dtype)).abs().amax().item()


def step_with(p, opt, grad):
    p.grad = grad
    opt.step()


# ------------------------------------------------------------------ non-finite gradients
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "posinf", "neginf"])
def test_R01_R03_nonfinite_gradient_skips_the_parameter(bad):
    a, b = nn.Parameter(torch.randn(4, 6)), nn.Parameter(torch.randn(4, 6))
    opt = aro.ARO([a, b])
    step_with(a, opt, torch.randn(4, 6))
    b.grad = torch.randn(4, 6)
    opt.step()
    before = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state[a].items()}
    a_before, b_before = a.detach().clone(), b.detach().clone()
    g = torch.randn(4, 6)
    g[1, 2] = bad
    a.grad, b.grad = g, torch.randn(4, 6)
    with pytest.warns(RuntimeWarning, match="skipped"):
        opt.step()
    assert torch.equal(a, a_before)  # skipped
    assert not torch.equal(b, b_before)  # the others still step
    for k, v in before.items():
        assert torch.equal(opt.state[a][k], v) if isinstance(v, torch.Tensor) else opt.state[a][k] == v
    assert opt.stats()["nonfinite_skips"] == 1


def test_R04_later_skips_are_counted_without_another_warning():
    p = nn.Parameter(torch.randn(3, 3))
    opt = aro.ARO([p])
    with pytest.warns(RuntimeWarning):
        step_with(p, opt, torch.full((3, 3), float("nan")))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step_with(p, opt, torch.full((3, 3), float("nan")))
    assert opt.stats()["nonfinite_skips"] == 2


def test_R05_nonfinite_raise_names_the_parameter():
    model = nn.Sequential(nn.Linear(3, 4))
    opt = aro.ARO(aro.param_groups(model), nonfinite="raise")
    model[0].weight.grad = torch.full((4, 3), float("nan"))
    model[0].bias.grad = torch.zeros(4)
    with pytest.raises(FloatingPointError, match="0.weight"):
        opt.step()


def test_R06_adamw_path_follows_the_same_policy():
    w = nn.Parameter(torch.randn(5))
    opt = aro.ARO([w])
    with pytest.warns(RuntimeWarning):
        step_with(w, opt, torch.tensor([1.0, float("nan"), 0.0, 0.0, 0.0]))
    assert len(opt.state[w]) == 0 and opt.stats()["nonfinite_skips"] == 1


def test_R07_nan_in_one_expert_skips_the_whole_parameter():
    p = nn.Parameter(torch.randn(3, 4, 5))
    opt = aro.ARO([p])
    before = p.detach().clone()
    g = torch.randn(3, 4, 5)
    g[2, 0, 0] = float("nan")
    with pytest.warns(RuntimeWarning):
        step_with(p, opt, g)
    assert torch.equal(p, before)


# ------------------------------------------------------------------ numerical extremes
def test_R09_zero_gradient_first_step():
    p = nn.Parameter(torch.ones(4, 6))
    opt = aro.ARO([p], lr=0.1, weight_decay=0.1)
    step_with(p, opt, torch.zeros(4, 6))
    torch.testing.assert_close(p.detach(), torch.full((4, 6), 0.99))
    assert torch.equal(opt.state[p]["rotation"], torch.eye(4))
    finite_everywhere(opt, [p])


def test_R10_zero_gradient_later_keeps_the_rotation():
    p = nn.Parameter(torch.randn(4, 6))
    opt = aro.ARO([p], beta=0.0, nesterov=False)  # beta 0: the momentum is the gradient
    step_with(p, opt, torch.randn(4, 6))
    R = opt.state[p]["rotation"].clone()
    step_with(p, opt, torch.zeros(4, 6))
    assert torch.equal(opt.state[p]["rotation"], R)
    assert opt.stats()["degenerate_rotations"] == 1


def test_R11_rank_one_momentum():
    p = nn.Parameter(torch.randn(8, 12))
    opt = aro.ARO([p])
    for _ in range(3):
        step_with(p, opt, torch.outer(torch.randn(8), torch.randn(12)))
    finite_everywhere(opt, [p])
    assert orth_err(opt.state[p]["rotation"]) < 1e-5


@pytest.mark.parametrize("scale", [1e-30, 1e30, 1e-40], ids=["1e-30", "1e30", "subnormal"])
@pytest.mark.parametrize("base", ["sinkhorn", "sign", "row_norm", "adam"])
def test_R12_R13_R14_R17_extreme_gradient_scales(scale, base):
    p = nn.Parameter(torch.randn(6, 10))
    q = nn.Parameter(torch.randn(10))
    opt = aro.ARO([p, q], lr=0.1, weight_decay=0.0, base=base)
    for _ in range(3):
        before = p.detach().clone()
        p.grad, q.grad = torch.randn(6, 10) * scale, torch.randn(10) * scale
        opt.step()
    finite_everywhere(opt, [p, q])
    assert orth_err(opt.state[p]["rotation"]) < 1e-5
    step_rms = (p.detach() - before).square().mean().sqrt().item()
    if scale > 1e-38:  # a subnormal gradient is a legal input; its direction may be mostly zero
        assert abs(step_rms - 0.02) < 1e-4


def test_R15_constant_gradient():
    p = nn.Parameter(torch.randn(5, 7))
    opt = aro.ARO([p])
    for _ in range(3):
        step_with(p, opt, torch.full((5, 7), 0.3))
    finite_everywhere(opt, [p])
    assert orth_err(opt.state[p]["rotation"]) < 1e-5


def test_R16_rows_of_wildly_different_scale():
    p = nn.Parameter(torch.randn(6, 9))
    opt = aro.ARO([p])
    scales = torch.logspace(-20, 20, 6)[:, None]
    for _ in range(3):
        step_with(p, opt, torch.randn(6, 9) * scales)
    finite_everywhere(opt, [p])
    assert orth_err(opt.state[p]["rotation"]) < 1e-5


# ------------------------------------------------------------------ QR faults
def test_R18_shifted_cholesky_breakdown_falls_back_and_is_counted(monkeypatch):
    prev = householder_qr(torch.randn(5, 5))
    B = torch.randn(5, 1)
    A = (B @ B.T)[None]  # rank 1
    out = orthonormalize(A, prev[None], method="shifted_cholesky", shift=0.0)  # no shift: Cholesky breaks
    assert int(out.fallbacks) == 1 and orth_err(out.Q) < 1e-5

    import aro.functional.rotation as rotation

    real = rotation.orthonormalize
    monkeypatch.setattr(rotation, "orthonormalize", lambda A, R, **kw: real(A, R, **{**kw, "shift": 0.0}))
    p = nn.Parameter(torch.randn(5, 8))
    opt = aro.ARO([p], qr="shifted_cholesky")
    step_with(p, opt, torch.outer(torch.randn(5), torch.randn(8)))
    assert opt.stats()["qr_fallbacks"] >= 1
    assert orth_err(opt.state[p]["rotation"]) < 1e-5


def test_R19_non_finite_cross_gram_keeps_the_previous_rotation():
    prev = householder_qr(torch.randn(2, 4, 4))
    A = torch.randn(2, 4, 4)
    A[0, 1, 1] = float("nan")
    out = orthonormalize(A, prev, method="householder")
    assert torch.equal(out.Q[0], prev[0]) and int(out.degenerate) == 1


def test_R20_counters_are_readable_and_monotonic():
    p = nn.Parameter(torch.randn(3, 3))
    opt = aro.ARO([p])
    seen = []
    for g in (torch.randn(3, 3), torch.zeros(3, 3), torch.full((3, 3), float("nan")), torch.randn(3, 3)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            step_with(p, opt, g)
        s = opt.stats()
        assert set(s) >= {"qr_fallbacks", "degenerate_rotations", "nonfinite_skips", "qr_per_step"}
        seen.append(s["degenerate_rotations"] + s["nonfinite_skips"])
    assert seen == sorted(seen)


# ------------------------------------------------------------------ shapes
@pytest.mark.parametrize(
    "shape", [(1, 7), (7, 1), (1, 1), (4, 8192), (8192, 4), (1, 6, 5), (3, 1, 1)],
    ids=["R21-1xn", "R22-mx1", "R23-1x1", "R24-4x8192", "R25-8192x4", "R29-E1", "R29-Ex1x1"],
)
def test_R21_R25_R29_shapes(shape):
    p = nn.Parameter(torch.randn(shape))
    opt = aro.ARO([p], lr=0.1)
    before = p.detach().clone()
    for _ in range(2):
        step_with(p, opt, torch.randn(shape))
    finite_everywhere(opt, [p])
    assert not torch.equal(p, before)
    assert orth_err(opt.state[p]["rotation"]) < 1e-5


def test_R26_empty_tensors_are_skipped():
    e, w = nn.Parameter(torch.randn(0, 5)), nn.Parameter(torch.randn(3, 5))
    opt = aro.ARO([e, w])
    e.grad, w.grad = torch.randn(0, 5), torch.randn(3, 5)
    opt.step()
    assert e.shape == (0, 5) and len(opt.state[e]) == 0 and "rotation" in opt.state[w]


def test_R27_non_contiguous_and_transposed_parameters():
    base = torch.randn(9, 5)
    p = nn.Parameter(base.T)  # non-contiguous leaf
    q = nn.Parameter(torch.randn(6, 10)[:, ::2])  # strided view
    opt = aro.ARO([p, q])
    ref_p, ref_q = nn.Parameter(p.detach().contiguous()), nn.Parameter(q.detach().contiguous())
    ref = aro.ARO([ref_p, ref_q])
    for _ in range(2):
        g1, g2 = torch.randn(5, 9), torch.randn(6, 5)
        p.grad, q.grad, ref_p.grad, ref_q.grad = g1, g2, g1.clone(), g2.clone()
        opt.step()
        ref.step()
    torch.testing.assert_close(p.detach(), ref_p.detach())
    torch.testing.assert_close(q.detach(), ref_q.detach())


def test_R28_R30_channels_last_conv_weight_is_flattened():
    conv = nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last)
    assert not conv.weight.is_contiguous()
    opt = aro.ARO(aro.param_groups(conv))
    plain = nn.Conv2d(3, 8, 3)
    plain.load_state_dict(conv.state_dict())
    opt_plain = aro.ARO([plain.weight, plain.bias])  # 4-D weight without a group key: flattened too
    x = torch.randn(2, 3, 8, 8)
    for model, o in ((conv, opt), (plain, opt_plain)):
        model(x).square().mean().backward()
        o.step()
    assert opt.state[conv.weight]["rotation"].shape == (8, 8)
    torch.testing.assert_close(conv.weight.detach().contiguous(), plain.weight.detach())


# ------------------------------------------------------------------ dtypes
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64],
                         ids=["R31-fp16", "R32-bf16", "R33-fp32", "R34-fp64"])
def test_R31_R34_dtypes(dtype):
    p = nn.Parameter(torch.randn(6, 8).to(dtype))
    v = nn.Parameter(torch.randn(8).to(dtype))
    opt = aro.ARO([p, v], base="adam")
    for _ in range(3):
        p.grad, v.grad = torch.randn(6, 8).to(dtype), torch.randn(8).to(dtype)
        opt.step()
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert p.dtype == dtype and opt.state[p]["momentum_buffer"].dtype == state_dtype
    assert opt.state[v]["exp_avg"].dtype == state_dtype
    finite_everywhere(opt, [p, v])


def test_R35_mixed_dtypes_in_one_group():
    a = nn.Parameter(torch.randn(4, 6))
    b = nn.Parameter(torch.randn(4, 6).bfloat16())
    c = nn.Parameter(torch.randn(4, 6).double())
    opt = aro.ARO([a, b, c])
    for _ in range(2):
        for p in (a, b, c):
            p.grad = torch.randn(4, 6).to(p.dtype)
        opt.step()
    finite_everywhere(opt, [a, b, c])
    assert opt.state[c]["rotation"].dtype == torch.float64 and opt.state[b]["rotation"].dtype == torch.float32


@pytest.mark.parametrize("t,match", [(torch.zeros(3, 3, dtype=torch.complex64), "complex"),
                                     (torch.zeros(3, 3, dtype=torch.int32), "floating-point")],
                         ids=["R36-complex", "R37-integer"])
def test_R36_R37_bad_dtypes(t, match):
    with pytest.raises(ValueError, match=match):
        aro.ARO([t])


# ------------------------------------------------------------------ state safety
def _trained(model_fn, steps=1, **kw):
    model = model_fn()
    opt = aro.ARO(model.parameters(), **kw)
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
    return model, opt


def test_R38_state_from_another_model_names_the_parameter():
    _, opt = _trained(lambda: nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2)))
    other = nn.Sequential(nn.Linear(4, 7), nn.Linear(7, 2))
    with pytest.raises(ValueError, match=r"index 0, shape \(7, 4\)"):
        aro.ARO(other.parameters()).load_state_dict(opt.state_dict())


def test_R39_state_with_other_groups_is_refused():
    model, opt = _trained(lambda: nn.Linear(4, 6))
    two = aro.ARO([{"params": [model.weight]}, {"params": [model.bias]}])
    with pytest.raises(ValueError, match="parameter groups"):
        two.load_state_dict(opt.state_dict())
    fewer = aro.ARO([model.weight])
    with pytest.raises(ValueError, match="parameters"):
        fewer.load_state_dict(opt.state_dict())


def test_R40_changed_orientation_or_corrupted_rotation_is_refused():
    model, opt = _trained(lambda: nn.Linear(4, 6))
    sd = opt.state_dict()
    bad = copy.deepcopy(sd)
    bad["state"][0]["rotation"] = torch.eye(6)  # (4, 4) expected: "cols" for a 6x4 weight
    with pytest.raises(ValueError, match="rotation"):
        aro.ARO(model.parameters()).load_state_dict(bad)
    bad = copy.deepcopy(sd)
    bad["state"][0]["orientation"] = "diagonal"
    with pytest.raises(ValueError, match="orientation"):
        aro.ARO(model.parameters()).load_state_dict(bad)


def test_R41_failed_load_leaves_the_optimizer_untouched():
    model, opt = _trained(lambda: nn.Linear(4, 6), steps=2)
    before = copy.deepcopy(opt.state_dict())
    bad = copy.deepcopy(before)
    bad["state"][0]["momentum_buffer"] = torch.zeros(3, 3)
    with pytest.raises(ValueError):
        opt.load_state_dict(bad)
    after = opt.state_dict()
    assert torch.equal(after["state"][0]["rotation"], before["state"][0]["rotation"])


def test_R42_add_param_group_after_steps():
    model, opt = _trained(lambda: nn.Linear(4, 6), steps=2)
    extra = nn.Parameter(torch.randn(5, 5))
    opt.add_param_group({"params": [extra], "lr": 0.05, "base": "sign"})
    before = extra.detach().clone()
    for p in list(model.parameters()) + [extra]:
        p.grad = torch.randn_like(p)
    opt.step()
    assert not torch.equal(extra, before) and "rotation" in opt.state[extra]


def test_R43_deepcopy_continues_identically():
    model, opt = _trained(lambda: nn.Linear(4, 6), steps=2)
    twin = copy.deepcopy(model)
    opt_twin = aro.ARO(twin.parameters())
    opt_twin.load_state_dict(copy.deepcopy(opt.state_dict()))
    clone = copy.deepcopy(opt)  # a deepcopy of the optimizer holds its own copies
    assert clone.state_dict()["state"][0]["rotation"].data_ptr() != opt.state_dict()["state"][0]["rotation"].data_ptr()
    g = [torch.randn_like(p) for p in model.parameters()]
    for p, q, gi in zip(model.parameters(), twin.parameters(), g):
        p.grad, q.grad = gi.clone(), gi.clone()
    opt.step()
    opt_twin.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_R44_pickled_state_dict_round_trip():
    model, opt = _trained(lambda: nn.Linear(4, 6), steps=2, base="adam")
    restored = pickle.loads(pickle.dumps(opt.state_dict()))
    fresh = aro.ARO(model.parameters(), base="adam")
    fresh.load_state_dict(restored)
    for k, v in opt.state[model.weight].items():
        assert torch.equal(fresh.state[model.weight][k], v) if isinstance(v, torch.Tensor) else fresh.state[model.weight][k] == v


@pytest.mark.parametrize("set_to_none", [True, False])
def test_R45_zero_grad_both_ways(set_to_none):
    model, opt = _trained(lambda: nn.Linear(4, 6), steps=1)
    opt.zero_grad(set_to_none=set_to_none)
    assert (model.weight.grad is None) == set_to_none
    before = model.weight.detach().clone()
    opt.step()
    if set_to_none:
        assert torch.equal(model.weight, before)  # no gradient: skipped, nothing invented
    else:
        assert not torch.equal(model.weight, before)  # a zero gradient is a gradient: momentum and decay act


# ------------------------------------------------------------------ conformance
def test_R47_state_dict_after_a_step_reloads_into_a_fresh_optimizer():
    model, opt = _trained(lambda: nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6)), steps=3)
    twin = copy.deepcopy(model)
    fresh = aro.ARO(twin.parameters())
    fresh.load_state_dict(opt.state_dict())
    g = [torch.randn_like(p) for p in model.parameters()]
    for p, q, gi in zip(model.parameters(), twin.parameters(), g):
        p.grad, q.grad = gi.clone(), gi.clone()
    opt.step()
    fresh.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))


def test_R48_scheduler_changes_take_effect():
    p = nn.Parameter(torch.zeros(4, 4, dtype=torch.float64))
    opt = aro.ARO([p], lr=1.0, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5**t)
    sizes = []
    for _ in range(3):
        before = p.detach().clone()
        step_with(p, opt, torch.randn(4, 4, dtype=torch.float64))
        sched.step()
        sizes.append((p - before).square().mean().sqrt().item())
    assert sizes == pytest.approx([0.2, 0.1, 0.05], rel=1e-9)


def test_R49_maximize_is_supported():
    p = nn.Parameter(torch.zeros(3, 5, dtype=torch.float64))
    opt = aro.ARO([p], lr=0.1, weight_decay=0.0, maximize=True)
    g = torch.randn(3, 5, dtype=torch.float64)
    step_with(p, opt, g)
    assert (p * g).sum() > 0  # moved up the gradient


def test_R50_R52_unsupported_modes_are_rejected_clearly():
    w = [nn.Parameter(torch.randn(2, 2))]
    with pytest.raises(ValueError, match="differentiable"):
        aro.ARO(w, differentiable=True)
    for kw in ("foreach", "fused", "capturable"):
        with pytest.raises(TypeError, match=kw):
            aro.ARO(w, **{kw: True})


def test_R51_step_hooks_run():
    p = nn.Parameter(torch.randn(3, 3))
    opt = aro.ARO([p])
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    step_with(p, opt, torch.randn(3, 3))
    assert calls == ["pre", "post"]


def test_R54_sparse_gradients_are_refused():
    emb = nn.Embedding(10, 4, sparse=True)
    opt = aro.ARO(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


def test_R55_a_parameter_in_two_groups_is_refused():
    p = nn.Parameter(torch.randn(3, 3))
    with pytest.raises(ValueError, match="more than one parameter group"):
        aro.ARO([{"params": [p]}, {"params": [p]}])


# ------------------------------------------------------------------ fuzzing
@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    shape=st.sampled_from([(1, 1), (1, 5), (5, 1), (3, 3), (4, 9), (9, 4), (2, 3, 4), (3,), (0, 3)]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]),
    log_scale=st.sampled_from([-40.0, -30.0, -8.0, 0.0, 8.0, 30.0]),
    special=st.sampled_from([None, "zero", "constant", "nan", "rank1"]),
    base=st.sampled_from(["sinkhorn", "sign", "row_norm", "adam", "identity", "newton_schulz"]),
    rotation=st.sampled_from(["aro", "eigen", "eigen_exact", "polar", "identity"]),
    qr=st.sampled_from(["householder", "shifted_cholesky"]),
    lr=st.sampled_from([0.0, 1e-3, 0.3]),
    nesterov=st.booleans(),
    rms_target=st.sampled_from([None, 0.2]),
    seed=st.integers(0, 1000),
)
def test_R53_fuzz_no_nonfinite_value_ever_reaches_parameters_or_state(
    shape, dtype, log_scale, special, base, rotation, qr, lr, nesterov, rms_target, seed
):
    g = torch.Generator().manual_seed(seed)
    p = nn.Parameter(torch.randn(shape, generator=g).to(dtype))
    opt = aro.ARO([p], lr=lr, base=base, rotation=rotation, qr=qr, nesterov=nesterov, rms_target=rms_target)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the documented non-finite warning
        for _ in range(2):
            grad = torch.randn(shape, generator=g, dtype=torch.float64) * 10.0**log_scale
            if special == "zero":
                grad.zero_()
            elif special == "constant":
                grad.fill_(10.0**log_scale)
            elif special == "nan" and grad.numel():
                grad.view(-1)[0] = float("nan")
            elif special == "rank1" and grad.ndim == 2 and grad.numel():
                grad = torch.outer(grad[:, 0], grad[0])
            p.grad = grad.to(dtype)
            opt.step()
    finite_everywhere(opt, [p])
    if "rotation" in opt.state[p]:
        assert orth_err(opt.state[p]["rotation"]) < (1e-2 if dtype != torch.float64 else 1e-8)
