"""TaylorSeer: what a CACHED step returns is the Taylor forecast the method defines."""

import numpy as np
import pytest
import torch

import lbridge
from lbridge.errors import LbridgeError
from lbridge.methods import load_method
from lbridge.methods.taylorseer import TaylorForecastHook
from lbridge.runtime.context import CacheRuntime, ManualClock
from lbridge.runtime.hooks import register
from lbridge.runtime.schedule import Schedule


def drive(order: int, schedule: str, feature) -> list[torch.Tensor]:
    """Call an identity module at every step with input feature(step); return what the hook gave back."""
    steps = Schedule.parse(schedule)
    runtime = CacheRuntime(ManualClock(len(steps)), steps)
    module = torch.nn.Identity()
    register(module, TaylorForecastHook(runtime, order, torch.float64), "test.taylor")
    outputs = []
    for step in range(len(steps)):
        runtime.clock.step = step
        runtime.enter_call("cond")
        outputs.append(module(feature(step)))
    return outputs


def linear(step: int) -> torch.Tensor:
    offset, slope = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 1.0])
    return (offset + 0.25 * step * slope).double()


@pytest.mark.parametrize("order", [1, 2, 3])
def test_a_linear_feature_sequence_is_forecast_exactly_once_two_full_steps_are_seen(order):
    outputs = drive(order, "FccFccccFcc", linear)
    for step in range(3, 11):  # from the second FULL step on
        torch.testing.assert_close(outputs[step], linear(step), rtol=0, atol=1e-12)
    assert not torch.allclose(outputs[1], linear(1))  # before that only F_0 is known: order 0


def test_order_zero_reuses_the_last_full_feature():
    outputs = drive(0, "FccFcc", linear)
    assert [float(o[0]) for o in outputs] == [float(linear(s)[0]) for s in (0, 0, 0, 3, 3, 3)]


def test_quadratic_feature_with_order_2_uses_divided_differences():
    def quadratic(step):
        return torch.tensor([float(step) ** 2], dtype=torch.float64)

    outputs = drive(2, "FcFcFcc", quadratic)
    # At step 5 the factors from FULL steps 0, 2, 4 are 16, (16-4)/2 = 6, (6-2)/2 = 2: 16 + 6 + 2/2 = 23.
    assert float(outputs[5][0]) == pytest.approx(23.0)


def test_a_new_sample_restarts_the_expansion():
    steps = Schedule.parse("FcFc")
    runtime = CacheRuntime(ManualClock(4), steps)
    module = torch.nn.Identity()
    register(module, TaylorForecastHook(runtime, 1, torch.float64), "test.taylor")
    for feature in (linear, lambda s: -linear(s)):
        outputs = []
        for step in range(4):
            runtime.clock.step = step
            runtime.enter_call("cond")
            outputs.append(module(feature(step)))
        torch.testing.assert_close(outputs[3], feature(3), rtol=0, atol=1e-12)


def test_taylorseer_order_0_equals_fora_on_the_tiny_model(tiny):
    adapter, pipe = tiny
    images = {}
    for name, params in (("fora", {}), ("taylorseer", {"order": 0})):
        acc = lbridge.accelerate(
            pipe,
            name,
            3.0,
            adapter=adapter,
            method_params=params,
            prompt="a cat",
            **adapter.pipeline_kwargs(),
        )
        images[name] = np.asarray(adapter.generate(pipe, "a handwritten digit 5", 3))
        acc.remove()
    assert np.array_equal(images["fora"], images["taylorseer"])


def test_bad_order_is_a_clear_error():
    with pytest.raises(LbridgeError, match=r"method.order=-1 must be an integer >= 0"):
        load_method("taylorseer", order=-1)
