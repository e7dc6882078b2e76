"""The schedule: which steps are FULL, and the solver from a target FLOPs ratio."""

import pytest

from lbridge.errors import LbridgeError
from lbridge.runtime.schedule import Schedule, solve


def test_first_step_must_be_full():
    with pytest.raises(ValueError):
        Schedule((False, True))


def test_interval_schedule_is_fora_n():
    assert str(Schedule.with_interval(10, 3, warmup=1)) == "FFccFccFcc"


def test_even_schedule_spreads_full_steps_at_equal_gaps():
    schedule = Schedule.with_full_count(20, 5, warmup=1)
    assert schedule.num_full == 5 and schedule.full[0]
    assert str(schedule) == "FcccFcccFcccFcccFccc"


@pytest.mark.parametrize("ratio", [1.0, 1.5, 2.0, 3.0, 4.5, 6.0])
@pytest.mark.parametrize("spacing", ["even", "interval"])
def test_solver_reaches_the_target_ratio(ratio, spacing):
    full, cached = 100.0, 7.0
    schedule = solve(50, full, cached, ratio, warmup=2, spacing=spacing)
    assert schedule.flops_ratio(full, cached) >= ratio
    assert schedule.full[:2] == (True, True)


def test_even_solver_takes_the_least_aggressive_schedule_that_reaches_the_ratio():
    schedule = solve(20, 1.0, 0.0, 2.0, warmup=1)
    assert schedule.num_full == 10  # 20 / 10 = 2.0 exactly; 11 FULL steps would fall short


def test_unreachable_ratio_names_the_maximum():
    with pytest.raises(LbridgeError, match=r"ratio=30 is above the maximum reachable 10\.00"):
        solve(10, 1.0, 0.0, 30.0, warmup=1)


def test_last_full_step():
    schedule = Schedule.parse("FccFc")
    assert [schedule.last_full(s) for s in range(5)] == [0, 0, 0, 3, 3]
