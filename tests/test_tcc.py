"""TCC: offline calibration priors added to a reuse policy's cached features, computed in step order."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from lbridge.calibration.job import CalibrationJob
from lbridge.calibration.trajectories import load_trajectories, output_streams
from lbridge.commands import calibrate
from lbridge.commands.collect import collect_trajectories
from lbridge.commands.setup import build_adapter, build_method, plan
from lbridge.config import CONF_DIR
from lbridge.errors import LbridgeError
from lbridge.methods import load_method
from lbridge.methods.base import CacheMethod
from lbridge.methods.tcc import Tcc
from lbridge.prompts import load_prompts
from lbridge.runtime.hooks import ModelHook
from lbridge.runtime.schedule import Schedule

# One offset per channel, the same at every step and for every prompt (a constant shift of every
# channel alike would vanish in the head's LayerNorm and never move the trajectory).
OFFSET = 0.2 * torch.randn(64, generator=torch.Generator().manual_seed(0))
STEPS = 6


class OffsetHook(ModelHook):
    def __init__(self, runtime) -> None:
        super().__init__()
        self.runtime = runtime

    def new_forward(self, module, *args, **kwargs):
        output = self.fn_ref.original_forward(*args, **kwargs)
        if self.runtime.is_full:
            return output
        return tuple(t + OFFSET for t in output_streams(output))  # both streams have 64 channels


class ConstantOffset(CacheMethod):
    """A base whose cached feature is the full-compute feature plus a constant (every block still runs)."""

    name = "offset"

    def install(self, transformer, adapter, runtime) -> None:
        self.add_hook(adapter.blocks(transformer)[-1], OffsetHook(runtime), "site")


def config(tmp_path, *extra: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose("calibrate", ["model=tiny", "model.device=cpu", "method=tcc", "ratio=1",
                                     f"model.num_inference_steps={STEPS}", "schedule.interval=2",
                                     "method.calibration.num_prompts=2", f"output_root={tmp_path}",
                                     *extra])  # fmt: skip


def job_for(cfg, method, pipe, schedule: str) -> CalibrationJob:
    adapter = build_adapter(cfg)
    prompts = load_prompts(cfg.prompts, 2, 1000)
    acc = plan(pipe, adapter, method, cfg, prompts[0].text)
    acc.runtime.schedule = Schedule.parse(schedule)
    root = collect_trajectories(cfg, adapter, pipe, prompts, 1000, "float32")
    trajectories = load_trajectories(root, [p.index for p in prompts])
    return CalibrationJob(cfg, adapter, pipe, acc, prompts, trajectories)


def fitted_priors(cfg, method: Tcc, pipe, schedule: str = "FcFcFc") -> dict:
    method.calibrate(job_for(cfg, method, pipe, schedule))
    return dict(method.priors)


@pytest.mark.parametrize(
    "target,mode", [("local", "iterative"), ("local", "naive"), ("reference", "iterative")]
)
def test_priors_recover_a_constant_offset_of_the_cached_feature(tiny, tmp_path, target, mode):
    cfg = config(tmp_path, f"method.calibration.target={target}", f"method.calibration.mode={mode}")
    method = Tcc(base=ConstantOffset(), calibration={"target": target, "mode": mode})
    priors = fitted_priors(cfg, method, tiny[1])
    assert sorted(priors) == [(b, s) for b in ("cond", "uncond") for s in (1, 3, 5)]
    for prior in priors.values():
        for c in prior:
            torch.testing.assert_close(c, (-OFFSET).expand_as(c), rtol=0, atol=2e-5)


def test_naive_priors_against_the_reference_miss_the_drift_the_iteration_accounts_for(tiny, tmp_path):
    cfg = config(tmp_path, "method.calibration.target=reference", "method.calibration.mode=naive")
    method = Tcc(base=ConstantOffset(), calibration={"target": "reference", "mode": "naive"})
    priors = fitted_priors(cfg, method, tiny[1])
    first, later = priors[("cond", 1)][1], priors[("cond", 5)][1]
    torch.testing.assert_close(first, (-OFFSET).expand_as(first), rtol=0, atol=2e-5)  # nothing drifted yet
    assert (later + OFFSET).abs().max() > 1e-2  # the uncorrected trajectory has drifted by step 5


@pytest.mark.parametrize("target", ["local", "reference"])
def test_iterative_equals_naive_when_there_is_one_cached_step(tiny, tmp_path, target):
    priors = {}
    for mode in ("iterative", "naive"):
        cfg = config(tmp_path, f"method.calibration.mode={mode}", f"method.calibration.target={target}")
        priors[mode] = fitted_priors(cfg, build_method(cfg.method), tiny[1], schedule="FFFcFF")
    assert priors["iterative"].keys() == priors["naive"].keys() == {("cond", 3), ("uncond", 3)}
    for key, prior in priors["iterative"].items():
        assert all(torch.equal(a, b) for a, b in zip(prior, priors["naive"][key], strict=True))


def test_channel_priors_are_one_value_per_channel(tiny, tmp_path):
    cfg = config(tmp_path, "method.granularity=channel")
    priors = fitted_priors(cfg, build_method(cfg.method), tiny[1])
    hidden = priors[("cond", 1)][1]
    assert hidden.shape == (1, 1, tiny[1].transformer.inner_dim)


def test_calibrated_priors_load_back_and_change_only_cached_steps(tiny, tmp_path):
    cfg = config(tmp_path, "method.base=taylorseer", "+method.base_params.order=1")
    out = calibrate.run(cfg)
    adapter, pipe = build_adapter(cfg), tiny[1]
    images = []
    for load in (True, True, False):
        method = build_method(cfg.method)
        acc = plan(pipe, adapter, method, cfg, "a handwritten digit 0")
        if load:
            method.load_calibration(out, pipe.transformer, acc.schedule)
        acc.attach()
        images.append(np.asarray(adapter.generate(pipe, "a handwritten digit 2", 3)))
        acc.remove()
    assert np.array_equal(images[0], images[1])  # the artifact reproduces its samples
    assert not np.array_equal(images[0], images[2])  # and the priors matter
    assert method.base.order == 1
    with pytest.raises(LbridgeError, match="was calibrated for schedule"):
        build_method(cfg.method).load_calibration(out, pipe.transformer, Schedule.parse("FccFcc"))


@pytest.mark.parametrize(
    "params,message",
    [
        ({"base": "l2p"}, r"unknown tcc method.base 'l2p' \(accepted: foca, fora, taylorseer, toca\)"),
        ({"base": "none"}, r"unknown tcc method.base 'none'"),
        ({"granularity": "pixel"}, r"unknown method.granularity 'pixel' \(accepted: token, channel\)"),
        ({"calibration": {"mode": "twice"}}, r"unknown method.calibration.mode 'twice'"),
        (
            {"calibration": {"target": "nowhere"}},
            r"unknown method.calibration.target 'nowhere' \(accepted: local, reference\)",
        ),
    ],
)
def test_bad_parameters_name_the_value_and_the_accepted_ones(params, message):
    with pytest.raises(LbridgeError, match=message):
        load_method("tcc", **params)
