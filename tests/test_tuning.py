"""qr="auto" / matmul_dtype="auto": the choice by measurement, its cache, and what it computes."""

import time
from unittest import mock

import pytest
import torch

import aro
from aro import tuning


@pytest.fixture(autouse=True)
def fresh_choices():
    saved = dict(tuning._CHOSEN)
    tuning._CHOSEN.clear()
    yield
    tuning._CHOSEN.clear()
    tuning._CHOSEN.update(saved)


def test_choose_takes_the_fastest_and_times_each_shape_once():
    calls = []

    def run(qr, dtype, threads):
        calls.append(qr)
        time.sleep(0.004 if threads is None else 0.0)

    options = [("householder", None, None), ("householder", None, 1)]
    assert tuning.choose("k", options, run, torch.device("cpu")) == ("householder", None, 1)
    assert len(calls) == 2 * (1 + tuning.ROUNDS)  # a warm-up and the rounds, for each candidate
    assert tuning.choose("k", options, run, torch.device("cpu")) == ("householder", None, 1)
    assert len(calls) == 2 * (1 + tuning.ROUNDS)  # cached
    assert tuning.choices() == {"k": "householder on 1 thread, float32 products"}


def test_options_offer_bfloat16_only_where_native_and_asked_for():
    cpu = torch.device("cpu")
    with mock.patch.object(tuning, "native_bf16", return_value=False), \
            mock.patch.object(torch, "get_num_threads", return_value=1):
        assert tuning.options("auto", "auto", cpu) == [("householder", None, None), ("shifted_cholesky", None, None)]
    with mock.patch.object(tuning, "native_bf16", return_value=True):
        assert ("householder", torch.bfloat16, None) in tuning.options("householder", "auto", cpu)
        assert tuning.options("householder", None, cpu) == [("householder", None, None)]  # pinned: nothing to time
        assert tuning.options("householder", "auto", cpu, torch.float64) == [("householder", None, None)]


def test_one_thread_qr_is_a_candidate_only_under_qr_auto_on_a_multithreaded_cpu():
    cpu = torch.device("cpu")
    with mock.patch.object(tuning, "native_bf16", return_value=False):
        with mock.patch.object(torch, "get_num_threads", return_value=2):
            assert tuning.options("auto", None, cpu) == [("householder", None, None), ("householder", None, 1),
                                                         ("shifted_cholesky", None, None)]
            assert tuning.options("householder", "auto", cpu) == [("householder", None, None)]  # qr pinned
            assert all(t is None for *_, t in tuning.options("auto", None, torch.device("meta")))
        with mock.patch.object(torch, "get_num_threads", return_value=1):
            assert all(t is None for *_, t in tuning.options("auto", None, cpu))


def test_the_qr_runs_on_the_threads_asked_for_and_restores_the_process_threads():
    from aro.functional import qr as qr_mod

    before = torch.get_num_threads()
    if before == 1:  # the process needs more than one thread for the test to mean anything
        torch.set_num_threads(2)
    try:
        _check_threads_of_the_qr(qr_mod)
    finally:
        torch.set_num_threads(before)


def _check_threads_of_the_qr(qr_mod):
    A = torch.randn(6, 48, 48)
    prev = torch.eye(48).expand(6, 48, 48)
    before = torch.get_num_threads()
    seen = []
    real = qr_mod.householder_qr

    def spy(X):
        seen.append(torch.get_num_threads())
        return real(X)

    with mock.patch.object(qr_mod, "householder_qr", spy):
        got = qr_mod.orthonormalize(A, prev, threads=1)
        assert seen == [1] and torch.get_num_threads() == before
        with pytest.raises(RuntimeError, match="boom"), mock.patch.object(qr_mod, "householder_qr",
                                                                          side_effect=RuntimeError("boom")):
            qr_mod.orthonormalize(A, prev, threads=1)
        assert torch.get_num_threads() == before  # restored after an error too
    with qr_mod.intra_op_threads(1):
        expected = qr_mod.orthonormalize(A, prev)  # the whole call on one thread
    assert torch.equal(got.Q, expected.Q)


def test_a_step_under_auto_runs_the_qr_on_the_chosen_threads():
    from aro.functional import qr as qr_mod

    seen = []
    real = qr_mod.householder_qr

    def spy(X):
        seen.append(torch.get_num_threads())
        return real(X)

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with mock.patch.object(tuning, "choose", return_value=("householder", None, 1)), \
                mock.patch.object(qr_mod, "householder_qr", spy):
            _step(qr="auto")
        assert seen and set(seen) == {1}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def _step(**kw):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(24, 16)) for _ in range(3)]  # one bucket, one choice
    opt = aro.ARO(params, lr=0.01, **kw)
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return [p.detach().clone() for p in params], opt


def test_auto_computes_exactly_what_its_choice_computes():
    got, opt = _step(qr="auto", matmul_dtype="auto")
    (choice,) = opt.stats()["auto_choices"].values()
    qr = choice.split(",")[0].split(" on ")[0]
    from aro.functional.qr import intra_op_threads

    with intra_op_threads(1 if " on 1 thread" in choice else None):  # these tiny products run on one thread anyway
        pinned, _ = _step(qr=qr, matmul_dtype=torch.bfloat16 if "bfloat16" in choice else None)
    for a, b in zip(got, pinned):
        assert torch.equal(a, b)
    reference, _ = _step(qr="householder")
    for a, b in zip(got, reference):  # every choice is the same algorithm (bf16 products: to their precision)
        assert (a - b).norm() / b.norm() < 3e-2


def test_bad_values_are_refused_with_the_options():
    p = [torch.nn.Parameter(torch.randn(4, 4))]
    with pytest.raises(ValueError, match="auto"):
        aro.ARO(p, qr="fastest")
    with pytest.raises(ValueError, match="'auto'"):
        aro.ARO(p, matmul_dtype="fast")
