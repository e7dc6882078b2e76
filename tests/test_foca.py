"""FoCa: what a CACHED step returns is the forecast-then-calibrate step of lbridge/methods/foca.py.

Notation of the module docstring: FULL features A_p, A_l and their slope g; points of the solve
Y_{k-1}, Y_k; forecast F^ = [(1+w)^2 Y_k - w^2 Y_{k-1} + (1+w) h g] / (1+2w); calibrated
F = (Y_k + h g)/2 + F^/2.
"""

from fractions import Fraction

import numpy as np
import pytest
import torch

import lbridge
from lbridge.errors import LbridgeError
from lbridge.methods import load_method
from lbridge.methods.foca import FocaHook
from lbridge.runtime.context import CacheRuntime, ManualClock
from lbridge.runtime.hooks import CallCounterHook, register, remove_all
from lbridge.runtime.schedule import Schedule


def hooked(schedule: str, module=None, calibrate=True, dtype=torch.float64):
    steps = Schedule.parse(schedule)
    runtime = CacheRuntime(ManualClock(len(steps)), steps)
    module = module if module is not None else torch.nn.Identity()
    hook = register(module, FocaHook(runtime, calibrate, dtype), "test.foca")
    return runtime, module, hook


def call(runtime, module, step, x, branch="cond"):
    runtime.clock.step = step
    runtime.enter_call(branch)
    return module(x)


def drive(schedule: str, feature, calibrate=True, steps=None) -> dict[int, torch.Tensor]:
    """Call an identity module at `steps` (default: every step) with input feature(step)."""
    runtime, module, _ = hooked(schedule, calibrate=calibrate)
    steps = range(len(schedule)) if steps is None else steps
    return {s: call(runtime, module, s, feature(s)) for s in steps}


def linear(step: int) -> torch.Tensor:
    offset, slope = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 1.0])
    return (offset + 0.25 * step * slope).double()


def square(step: int) -> torch.Tensor:
    return torch.tensor([float(step) ** 2], dtype=torch.float64)


def value(output: torch.Tensor) -> Fraction:
    return Fraction(float(output[0])).limit_denominator(1000)


@pytest.mark.parametrize("schedule", ["FccFccccFcc", "FcFcccFcFc", "FFcccFcc"])
@pytest.mark.parametrize("calibrate", [True, False])
def test_a_linear_feature_is_solved_exactly_once_two_full_steps_are_seen(schedule, calibrate):
    outputs = drive(schedule, linear, calibrate)
    second_full = [s for s, c in enumerate(schedule) if c == "F"][1]
    for step in range(second_full, len(schedule)):  # even gaps and uneven ones
        torch.testing.assert_close(outputs[step], linear(step), rtol=0, atol=1e-12)


def test_before_the_second_full_step_a_cached_step_reuses_the_last_full_feature():
    outputs = drive("FccFcc", linear)
    assert [float(outputs[s][0]) for s in (0, 1, 2)] == [float(linear(0)[0])] * 3
    assert float(outputs[4][0]) == pytest.approx(float(linear(4)[0]))  # A_0 and A_3 give the slope


def test_hand_computed_forecast_then_calibrate_on_a_quadratic_feature():
    # F(s) = s^2 with FULL steps 0, 1, 3.
    # Step 2: g = 1, Y = (0, 1), w = 1: F^ = (4*1 - 0 + 2*1)/3 = 2; F = (1 + 1)/2 + 2/2 = 2.
    # Step 4: FULL 1 and 9 give g = (9 - 1)/2 = 4; Y = (2, 9): F^ = (4*9 - 2 + 2*4)/3 = 14;
    #         F = (9 + 4)/2 + 14/2 = 27/2 (the linear extrapolation of the FULL steps gives 13).
    # Step 5: Y = (9, 27/2): F^ = (4*27/2 - 9 + 2*4)/3 = 53/3; F = (27/2 + 4)/2 + 53/6 = 211/12.
    outputs = drive("FFcFcc", square)
    assert [value(outputs[s]) for s in (2, 4, 5)] == [2, Fraction(27, 2), Fraction(211, 12)]


def test_without_calibration_the_forecast_is_returned_and_continued_from():
    # Step 4 as above: F^ = 14, now the next point. Step 5: F^ = (4*14 - 9 + 2*4)/3 = 55/3.
    outputs = drive("FFcFcc", square, calibrate=False)
    assert [value(outputs[s]) for s in (2, 4, 5)] == [2, 14, Fraction(55, 3)]


def test_uneven_gap_uses_the_variable_step_coefficients():
    # As above up to step 3, then the site is next called at step 5: h = 2, h' = 1, w = 2, g = 4.
    # F^ = (9*9 - 4*2 + 3*2*4)/5 = 97/5; F = (9 + 2*4)/2 + 97/10 = 91/5.
    outputs = drive("FFcFcc", square, steps=[0, 1, 2, 3, 5])
    assert value(outputs[5]) == Fraction(91, 5)


def test_after_a_full_step_the_solve_continues_from_the_last_calibrated_point():
    # The two FULL-step slopes agree (g = 1 at step 4), but Y_{k-1} is the calibrated point of step 3,
    # not a FULL feature: the forecast uses the history of the solve, as an ODE multistep method does.
    def bent(step):  # linear with slope 1, except a kink: F(4) = 4 but F(1) = 1, F(0) = 0
        return torch.tensor([float(step) if step != 2 else 5.0], dtype=torch.float64)

    outputs = drive("FFFcFc", bent)
    # Step 3: g = 5 - 1 = 4 from FULL steps 1, 2; Y = (1, 5): F^ = (20 - 1 + 8)/3 = 9; F = (5+4)/2 + 9/2 = 9.
    # Step 5: g = (4 - 5)/2 = -1/2 from FULL steps 2, 4; Y = (9, 4): F^ = (16 - 9 - 1)/3 = 2;
    #         F = (4 - 1/2)/2 + 2/2 = 11/4.
    assert [value(outputs[s]) for s in (3, 5)] == [9, Fraction(11, 4)]


def test_each_cfg_branch_has_its_own_solve():
    runtime, module, _ = hooked("FFcc")
    outputs = {}
    for step in range(4):
        for branch, sign in (("cond", 1.0), ("uncond", -1.0)):
            outputs[branch, step] = call(runtime, module, step, sign * linear(step), branch)
    for step in (2, 3):
        torch.testing.assert_close(outputs["cond", step], linear(step), rtol=0, atol=1e-12)
        torch.testing.assert_close(outputs["uncond", step], -linear(step), rtol=0, atol=1e-12)


def test_a_new_sample_restarts_the_solve():
    runtime, module, hook = hooked("FFcc")
    for feature in (linear, lambda s: 10 - 3 * linear(s)):
        outputs = [call(runtime, module, s, feature(s)) for s in range(4)]
        torch.testing.assert_close(outputs[3], feature(3), rtol=0, atol=1e-12)
    hook.reset()
    assert hook.states == {}


class Pair(torch.nn.Module):
    """A block that returns (encoder, hidden), as the FLUX double-stream blocks do."""

    def forward(self, x):
        return 2 * x, -x


def test_tuple_outputs_are_solved_element_wise_in_float32_and_keep_their_dtype():
    runtime, module, _ = hooked("FFc", module=Pair(), dtype=torch.float32)
    for step in range(2):
        call(runtime, module, step, linear(step).to(torch.bfloat16))
    encoder, hidden = call(runtime, module, 2, torch.zeros(2, dtype=torch.bfloat16))
    assert encoder.dtype == hidden.dtype == torch.bfloat16
    # The forecast is computed in float32 from the stored bfloat16 outputs, then cast back.
    expected = 2 * (2 * linear(1).bfloat16().float() - linear(0).bfloat16().float())
    torch.testing.assert_close(encoder, expected.bfloat16(), rtol=0, atol=0)
    torch.testing.assert_close(hidden, (-expected / 2).bfloat16(), rtol=0, atol=0)


def test_memory_is_two_full_features_and_two_points_of_the_solve():
    runtime, module, hook = hooked("FcFcFcFcFcFc")
    for step in range(12):
        call(runtime, module, step, linear(step))
    state = hook.states["cond"]
    assert len(state.anchors) == 2 and len(state.points) == 2
    stored = {id(t) for _, features in state.anchors + state.points for t in features}
    assert len(stored) <= 3  # the last FULL feature is both an anchor and a point, stored once


@pytest.mark.parametrize(
    "params,message",
    [
        ({"calibrate": "yes"}, r"method.calibrate='yes' must be true or false"),
        ({"compute_dtype": "float64"}, r"unknown method.compute_dtype 'float64' \(accepted: float32, "),
        ({"site": "block"}, r"unknown foca site 'block' \(accepted: stack, attn_mlp\)"),
    ],
)
def test_bad_parameters_are_a_clear_error(params, message):
    with pytest.raises(LbridgeError, match=message):
        load_method("foca", **params)


def sample(adapter, pipe):
    kwargs = {**adapter.pipeline_kwargs(), "output_type": "np"}
    return np.asarray(pipe("a handwritten digit 3", generator=adapter.generator(0), **kwargs).images)


@pytest.mark.parametrize("site", ["stack", "attn_mlp"])
def test_foca_at_ratio_3_on_the_tiny_model_runs_fewer_blocks_and_beats_reuse(tiny, site):
    adapter, pipe = tiny
    blocks = adapter.blocks(pipe.transformer)
    counters = [register(b, CallCounterHook(), "test.count") for b in blocks]  # innermost: real runs
    images, calls = {}, {}
    try:
        for method in ("none", "fora", "foca"):
            acc = lbridge.accelerate(
                pipe, method, 3.0, adapter=adapter, prompt="a cat", method_params={"site": site},
                **adapter.pipeline_kwargs(),
            ) if method != "none" else None  # fmt: skip
            for c in counters:
                c.count = 0
            try:
                images[method] = sample(adapter, pipe)
            finally:
                if acc is not None:
                    acc.remove()
            calls[method] = sum(c.count for c in counters)
    finally:
        remove_all(pipe.transformer, ["test.count"])
    assert acc.flops_ratio >= 3.0
    if site == "stack":
        assert calls["foca"] == 2 * acc.schedule.num_full * len(blocks) < calls["none"]
    else:  # blocks still run their modulation and residuals; the attention and MLP are forecast
        assert calls["foca"] == calls["none"]
    assert np.isfinite(images["foca"]).all() and not np.array_equal(images["foca"], images["none"])
    error = {m: np.abs(images[m] - images["none"]).mean() for m in ("fora", "foca")}
    assert error["foca"] < error["fora"]  # the solve follows the features better than reusing them
