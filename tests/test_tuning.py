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

    def run(qr, dtype):
        calls.append(qr)
        time.sleep(0.004 if qr == "householder" else 0.0)

    options = [("householder", None), ("shifted_cholesky", None)]
    assert tuning.choose("k", options, run, torch.device("cpu")) == ("shifted_cholesky", None)
    assert len(calls) == 2 * (1 + tuning.ROUNDS)  # a warm-up and the rounds, for each candidate
    assert tuning.choose("k", options, run, torch.device("cpu")) == ("shifted_cholesky", None)
    assert len(calls) == 2 * (1 + tuning.ROUNDS)  # cached
    assert tuning.choices() == {"k": "shifted_cholesky, float32 products"}


def test_options_offer_bfloat16_only_where_native_and_asked_for():
    cpu = torch.device("cpu")
    with mock.patch.object(tuning, "native_bf16", return_value=False):
        assert tuning.options("auto", "auto", cpu) == [("householder", None), ("shifted_cholesky", None)]
    with mock.patch.object(tuning, "native_bf16", return_value=True):
        assert ("householder", torch.bfloat16) in tuning.options("householder", "auto", cpu)
        assert tuning.options("householder", None, cpu) == [("householder", None)]  # pinned: nothing to time
        assert tuning.options("householder", "auto", cpu, torch.float64) == [("householder", None)]


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
    qr = choice.split(",")[0]
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
