"""L2P: a CACHED step is a per-step linear combination of the last FULL steps' features, fitted in seconds."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import save_file

import lbridge
from lbridge.calibration.l2p_fit import NormalEquations, accumulate
from lbridge.calibration.trajectories import Trajectory
from lbridge.commands import calibrate
from lbridge.commands.setup import build_adapter, build_method, plan
from lbridge.config import CONF_DIR
from lbridge.errors import LbridgeError
from lbridge.methods import load_method
from lbridge.methods.l2p import taylor_weights
from lbridge.runtime.schedule import Schedule

SCHEDULE = "FccFccFcccFccFccFccc"


def np_images(adapter, pipe, prompt="a handwritten digit 3", seed=4) -> np.ndarray:
    kwargs = {**adapter.pipeline_kwargs(), "output_type": "np"}
    return np.asarray(pipe(prompt, generator=adapter.generator(seed), **kwargs).images)


def sample_with(method, adapter, pipe, weights=None) -> np.ndarray:
    acc = lbridge.accelerate(pipe, method, 1, adapter=adapter, interval=3, **adapter.pipeline_kwargs())
    try:
        if weights is not None:
            method.set_weights(weights(acc.schedule))
        return np_images(adapter, pipe)
    finally:
        acc.remove()


@pytest.mark.parametrize("gap", [1, 3, 4])
def test_taylor_weights_match_the_closed_form_forecasts(gap):
    fulls = [2 * gap, gap, 0]  # most recent first, evenly spaced
    for k in range(1, gap + 1):
        step, r = 2 * gap + k, k / gap
        assert taylor_weights(fulls, step, 0) == (1.0,)
        assert taylor_weights(fulls, step, 1) == pytest.approx((1 + r, -r))
        assert taylor_weights(fulls, step, 2) == pytest.approx((1 + r + r * r / 2, -r - r * r, r * r / 2))


def test_reuse_weights_reproduce_fora_bit_for_bit(tiny):
    adapter, pipe = tiny
    fora = sample_with(load_method("fora"), adapter, pipe)
    l2p = load_method("l2p", history=3)
    reuse = sample_with(l2p, adapter, pipe, lambda s: {i: (1.0,) for i in range(len(s)) if not s.is_full(i)})
    assert np.array_equal(fora, reuse)


@pytest.mark.parametrize("order", [1, 2])
def test_taylor_weights_reproduce_taylorseer_of_order_1_and_2(tiny, order):
    adapter, pipe = tiny
    taylorseer = sample_with(load_method("taylorseer", order=order), adapter, pipe)
    l2p = load_method("l2p", history=order + 1)

    def weights(schedule: Schedule) -> dict:
        cached = [s for s in range(len(schedule)) if not schedule.is_full(s)]
        return {s: taylor_weights(schedule.full_history(s, order + 1), s, order) for s in cached}

    predicted = sample_with(l2p, adapter, pipe, weights)
    np.testing.assert_allclose(predicted, taylorseer, rtol=0, atol=1e-5)
    assert not np.allclose(predicted, sample_with(load_method("fora"), adapter, pipe), atol=1e-3)


def linear_trajectories(tmp_path, block, schedule: Schedule, true_weights: dict, count: int = 2) -> list:
    """Shards whose CACHED-step outputs are exactly the given combinations of random FULL-step outputs."""
    generator = torch.Generator().manual_seed(0)
    trajectories = []
    for index in range(count):
        tensors = {}
        for branch in ("cond", "uncond"):
            features = {}
            for step in range(len(schedule)):
                if schedule.is_full(step):
                    features[step] = torch.randn(2, 1, 6, 8, generator=generator)
                else:
                    fulls = schedule.full_history(step, len(true_weights[step]))
                    features[step] = sum(
                        w * features[f] for w, f in zip(true_weights[step], fulls, strict=True)
                    )
                tensors[f"{branch}/{step:03d}/output.encoder"] = features[step][0].contiguous()
                tensors[f"{branch}/{step:03d}/output.hidden"] = features[step][1].contiguous()
        path = tmp_path / f"prompt-{index}.safetensors"
        save_file(tensors, str(path))
        trajectories.append(Trajectory(path))
    return trajectories


def test_fitting_an_exactly_linear_sequence_recovers_the_true_weights(tiny, tmp_path):
    adapter, pipe = tiny
    block = adapter.blocks(pipe.transformer)[-1]
    schedule = Schedule.parse(SCHEDULE)
    cached = [s for s in range(len(schedule)) if not schedule.is_full(s)]
    generator = torch.Generator().manual_seed(1)
    true = {
        s: tuple(torch.randn(len(schedule.full_history(s, 3)), generator=generator).tolist()) for s in cached
    }
    histories = {s: schedule.full_history(s, 3) for s in cached}
    systems = accumulate(linear_trajectories(tmp_path, block, schedule, true), block, histories)
    for step, system in systems.items():
        prior = torch.zeros(len(histories[step]), dtype=torch.float64)
        fitted = system.solve(prior, ridge=0.0)
        assert fitted.tolist() == pytest.approx(true[step], abs=1e-5)  # float32 shards
        assert system.relative_error(fitted) == pytest.approx(0.0, abs=1e-10)


def test_the_ridge_pulls_towards_the_prior_weights():
    system = NormalEquations(2)
    history = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0001]])  # nearly collinear
    system.add(history, torch.tensor([2.0, 4.0, 6.0]))
    prior = torch.tensor([1.0, 0.0], dtype=torch.float64)
    loose, tight = system.solve(prior, 0.0), system.solve(prior, 1e3)
    assert (tight - prior).norm() < 1e-2 < (loose - prior).norm()


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    root = tmp_path_factory.mktemp("l2p")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("calibrate", ["model=tiny", "model.device=cpu", "method=l2p", "ratio=3",
                                    f"output_root={root}"])  # fmt: skip
    return cfg, calibrate.run(cfg)


def test_calibration_writes_one_weight_vector_per_cached_step_in_seconds(calibrated, capsys):
    cfg, out = calibrated
    metadata = json.loads((out / "calibration.json").read_text())
    schedule = Schedule.parse(metadata["schedule"])
    cached = [s for s in range(len(schedule)) if not schedule.is_full(s)]
    assert sorted(int(s) for s in metadata["weights"]) == cached
    for step, weights in metadata["weights"].items():
        assert len(weights) == len(schedule.full_history(int(step), 3))
    fit = metadata["fit"]
    assert fit["seconds"] < 30  # least squares on 5 tiny trajectories
    errors = fit["relative_error"].values()
    assert sum(e["fit"] for e in errors) < sum(e["reuse"] for e in errors)


def test_loaded_weights_change_the_samples_and_are_refused_for_another_schedule(calibrated, tiny):
    cfg, out = calibrated
    adapter, pipe = build_adapter(cfg), tiny[1]
    method = build_method(cfg.method)
    acc = plan(pipe, adapter, method, cfg, "a handwritten digit 0")
    method.load_calibration(out, pipe.transformer, acc.schedule)
    assert method.weights and all(w != (1.0,) for w in method.weights.values())
    with pytest.raises(LbridgeError, match="was calibrated for schedule .* not FcFc"):
        method.load_calibration(out, pipe.transformer, Schedule.parse("Fc" * 10))


@pytest.mark.parametrize(
    "params,message",
    [
        ({"history": 0}, r"method.history=0 must be an integer >= 1"),
        ({"ridge": -1}, r"method.ridge=-1 must be a number >= 0"),
        ({"init": "taylor7"}, r"unknown method.init 'taylor7' \(accepted: reuse, taylor1, taylor2\)"),
    ],
)
def test_bad_parameters_name_the_value_and_the_accepted_ones(params, message):
    with pytest.raises(LbridgeError, match=message):
        load_method("l2p", **params)
