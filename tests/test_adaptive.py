"""Adaptive methods (TeaCache, FirstBlockCache, MagCache): run-time decisions, their accounting, the solve."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.hooks.mag_cache import MagCacheConfig, apply_mag_cache
from test_cli import lbridge

import lbridge as lb
from lbridge.calibration.job import CalibrationJob
from lbridge.errors import LbridgeError
from lbridge.methods.base import load_method
from lbridge.methods.magcache import magnitude_ratios
from lbridge.prompts import Prompt
from lbridge.runtime.context import CacheRuntime, ManualClock
from lbridge.runtime.hooks import ModelHook, register, remove_all
from lbridge.runtime.schedule import Schedule

PROMPT = "a photo of the digit 3"


def attach(tiny, method: str, ratio: float = 1.0, **params) -> lb.Accelerator:
    adapter, pipe = tiny
    call = {**adapter.prompt_kwargs(pipe, PROMPT), **adapter.pipeline_kwargs()}
    return lb.accelerate(pipe, method, ratio, adapter=adapter, method_params=params, **call)


def sample(tiny, acc: lb.Accelerator, seed: int = 0) -> None:
    adapter, pipe = tiny
    acc.reset()
    adapter.generate(pipe, PROMPT, seed)


def test_decide_moves_the_call_between_counters_and_steps_the_schedule_forces_stay_full():
    runtime = CacheRuntime(ManualClock(3), Schedule.parse("Fcc"))
    runtime.enter_call("cond")
    runtime.decide(False)  # step 0 is forced FULL by the schedule
    assert runtime.is_full and (runtime.full_calls, runtime.cached_calls) == (1, 0)
    runtime.clock.step = 1
    runtime.enter_call("cond")
    assert not runtime.is_full  # a candidate: CACHED until the probe says otherwise
    runtime.decide(True)
    assert runtime.is_full and (runtime.full_calls, runtime.cached_calls) == (2, 0)
    runtime.clock.step = 2
    runtime.enter_call("cond")
    runtime.decide(False)
    assert (runtime.full_calls, runtime.cached_calls) == (2, 1)
    assert runtime.realised_schedule() == "FFc"


def test_teacache_skips_while_the_accumulated_distance_stays_under_the_threshold(tiny):
    threshold = 0.3
    acc = attach(tiny, "teacache", threshold=threshold, coefficients=None)  # raw distances
    try:
        acc.method.recorded_distances = distances = []
        sample(tiny, acc)
    finally:
        acc.remove()
    forced = acc.schedule  # first and last steps
    for branch in ("cond", "uncond"):
        expected, accumulated = ["F"], 0.0
        for _, step, distance in sorted(d for d in distances if d[0] == branch):
            accumulated += distance
            full = accumulated >= threshold or forced.is_full(step)
            accumulated = 0.0 if full else accumulated
            expected.append("F" if full else "c")
        realised = "".join("F" if acc.runtime.realised[(branch, s)] else "c" for s in range(len(forced)))
        assert realised == "".join(expected)
        assert "c" in realised and realised.count("F") > 2


class _Spy(ModelHook):
    def __init__(self, runtime):
        super().__init__()
        self.runtime, self.inputs, self.outputs = runtime, {}, {}

    def new_forward(self, module, *args, **kwargs):
        output = self.fn_ref.original_forward(*args, **kwargs)
        key = (self.runtime.branch, self.runtime.step)
        self.inputs[key] = kwargs.get("hidden_states", args[0] if args else None)
        self.outputs[key] = output[1] if isinstance(output, tuple) else output
        return output


def test_teacache_cached_step_adds_the_last_full_residual_to_its_input(tiny):
    adapter, _ = tiny
    acc = attach(tiny, "teacache", threshold=math.inf, coefficients=None)  # skip every candidate
    blocks = adapter.blocks(acc.transformer)
    first, last = _Spy(acc.runtime), _Spy(acc.runtime)
    register(blocks[0], first, "test.first")  # outermost: sees what the block stack receives/returns
    register(blocks[-1], last, "test.last")
    try:
        sample(tiny, acc)
    finally:
        remove_all(acc.transformer, ["test.first", "test.last"])
        acc.remove()
    schedule = acc.schedule
    for step in range(len(schedule)):
        if schedule.is_full(step):
            continue
        key, full = ("cond", step), ("cond", schedule.last_full(step))
        residual = last.outputs[full] - first.inputs[full]
        torch.testing.assert_close(last.outputs[key], first.inputs[key] + residual)


def test_teacache_rescales_with_the_polynomial_and_refuses_an_unfitted_one():
    method = load_method("teacache", threshold=0.2, coefficients=[2.0, 0.5])  # 2d + 0.5
    assert method.rescale(0.25) == pytest.approx(1.0)
    assert load_method("teacache", threshold=0.2, coefficients=None).rescale(0.25) == 0.25
    with pytest.raises(LbridgeError, match="coefficients=fit: run `lbridge calibrate` first"):
        load_method("teacache", threshold=0.2).rescale(0.25)


@pytest.mark.parametrize(
    "method,params,message",
    [
        ("teacache", {"threshold": -1}, "method.threshold=-1 must be a number >= 0, or null"),
        ("teacache", {"coefficients": "auto"}, "method.coefficients='auto' is not accepted (fit, null,"),
        ("teacache", {"degree": 0}, "method.degree=0 must be an integer >= 1"),
        ("magcache", {"max_skip_steps": 0}, "method.max_skip_steps=0 must be an integer >= 1"),
        ("magcache", {"retention_ratio": 1.5}, "method.retention_ratio=1.5 must be a number in [0, 1)"),
        ("magcache", {"mag_ratios": "wan"}, "method.mag_ratios='wan' is not accepted (fit, flux,"),
        ("fbcache", {"threshold": "low"}, "method.threshold='low' must be a number >= 0"),
    ],
)
def test_bad_parameters_give_one_line_errors(method, params, message):
    with pytest.raises(LbridgeError, match=re.escape(message)):
        load_method(method, **params)


def test_fitted_mag_ratios_equal_diffusers_own_calibration_mode(tiny, capsys):
    adapter, pipe = tiny
    acc = attach(tiny, "magcache", threshold=0.0)
    job = CalibrationJob(None, adapter, pipe, acc, [Prompt(0, PROMPT, 0)], [])
    ours = magnitude_ratios(job)
    acc.method.reset()

    steps = len(acc.schedule)
    apply_mag_cache(pipe.transformer, MagCacheConfig(calibrate=True, num_inference_steps=steps))
    try:
        capsys.readouterr()
        adapter.generate(pipe, PROMPT, 0)
        printed = capsys.readouterr().out
    finally:
        remove_all(pipe.transformer, ["mag_cache_leader_block_hook", "mag_cache_block_hook"])
    per_branch = [json.loads(line) for line in printed.splitlines() if line.startswith("[1.0")]
    assert len(per_branch) == 2  # cond and uncond, one list each
    np.testing.assert_allclose(ours, np.mean(per_branch, axis=0), rtol=1e-5)
    assert len(ours) == steps and ours[0] == 1.0


def test_schedule_interval_is_refused_for_adaptive_methods(tiny):
    adapter, pipe = tiny
    call = {**adapter.prompt_kwargs(pipe, PROMPT), **adapter.pipeline_kwargs()}
    with pytest.raises(LbridgeError, match="schedule.interval=2 fixes a static schedule; teacache decides"):
        lb.accelerate(pipe, "teacache", 2.0, adapter=adapter, interval=2, **call)


def test_a_ratio_above_skipping_every_candidate_stops_before_anything_runs(tiny):
    maximum = r"ratio=1000 is above the maximum reachable \d+\.\d\d for teacache"
    with pytest.raises(LbridgeError, match=maximum):
        attach(tiny, "teacache", 1000.0)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["teacache", "fbcache", "magcache"])
def test_calibrate_solves_the_smallest_threshold_that_reaches_the_ratio(tmp_path: Path, method):
    ratio, tolerance = 2.0, 0.01
    common = [f"method={method}", f"ratio={ratio}", "method.calibration.num_prompts=2", "output_root=out"]
    done = lbridge("calibrate", *common, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    (artifact,) = (tmp_path / "out" / "calibration" / "tiny").iterdir()
    fit = json.loads((artifact / "calibration.json").read_text())["fit"]
    assert fit["flops_ratio"] >= ratio
    below = [s for s in fit["search"] if s["flops_ratio"] < ratio]
    assert max(float(s["threshold"]) for s in below) >= fit["threshold"] * (1 - 2 * tolerance)
    assert f"threshold {fit['threshold']:.6g} (solved) reaches FLOPs ratio" in done.stdout

    sampled = lbridge("sample", *common, "num_prompts=2", cwd=tmp_path)
    assert sampled.returncode == 0, sampled.stderr
    records = (tmp_path / "out" / "sample" / "tiny").glob(f"{method}-*/samples.jsonl")
    for line in next(records).read_text().splitlines():
        assert re.fullmatch("F[Fc]+", json.loads(line)["schedule"])


def test_sampling_needs_a_calibration_or_an_explicit_threshold(tmp_path: Path):
    missing = lbridge("sample", "method=teacache", "num_prompts=1", "output_root=out", cwd=tmp_path)
    assert missing.returncode != 0
    assert "no teacache calibration at" in missing.stderr and "run `lbridge calibrate`" in missing.stderr
    given = lbridge(
        "sample", "method=fbcache", "method.threshold=0.3", "num_prompts=1", "output_root=out", cwd=tmp_path
    )
    assert given.returncode == 0, given.stderr
    assert "FLOPs speedup" in given.stdout
