import math

import pytest

from aro.bench.metrics import first_crossing, mean_std, speedup

STEPS = [0, 10, 20, 30, 40]


def test_first_crossing_interpolates():
    assert first_crossing(STEPS, [5.0, 4.0, 3.0, 2.0, 1.0], 2.5) == pytest.approx(25.0)
    assert first_crossing(STEPS, [5.0, 4.0, 3.0, 2.0, 1.0], 3.0) == pytest.approx(20.0)  # exactly reached
    assert first_crossing(STEPS, [5.0, 4.0, 3.0, 2.0, 1.0], 0.5) is None
    assert first_crossing(STEPS, [5.0, 4.0, None, 2.0, 1.0], 1.0) is None  # a non-finite eval ends the curve


def test_speedup_reached():
    base = [5.0, 4.0, 3.0, 2.5, 2.0]
    fast = [5.0, 3.5, 2.0, 1.8, 1.6]
    assert speedup(STEPS, fast, STEPS, base, 40) == pytest.approx(2.0)  # fast reaches 2.0 at step 20


def test_speedup_exactly_reached_at_end_is_one():
    base = [5.0, 4.0, 3.0, 2.5, 2.0]
    assert speedup(STEPS, base, STEPS, base, 40) == pytest.approx(1.0)


def test_speedup_never_reached_is_inverted_below_one():
    base = [5.0, 4.0, 3.0, 2.5, 2.0]
    slow = [5.0, 4.5, 4.0, 3.5, 3.0]
    # slow ends at 3.0; base reached 3.0 at step 20 -> 20/40
    assert speedup(STEPS, slow, STEPS, base, 40) == pytest.approx(0.5)


def test_speedup_undefined_for_diverged_or_flat_baseline():
    assert speedup(STEPS, [5, 4, 3, 2, 1.0], STEPS, [5, 4, None, None, None], 40) is None
    assert speedup(STEPS, [5, 4, 3, 2, None], STEPS, [5, 4, 3, 2, 1.0], 40) is None
    assert speedup(STEPS, [5, 4, 3, 2, 1.0], STEPS, [5, 6, 7, 8, 9.0], 40) is None  # baseline never improved


def test_mean_std():
    s = mean_std([1.0, 2.0, 3.0])
    assert s["mean"] == 2.0 and s["std"] == pytest.approx(1.0) and s["per_seed"] == [1.0, 2.0, 3.0]
    assert mean_std([1.5])["std"] == 0.0
    assert mean_std([None])["mean"] is None
    assert math.isclose(mean_std([1.0, None, 3.0])["mean"], 2.0)
