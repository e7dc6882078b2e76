"""LearniBridge: trajectories, LoRA calibration of the final block, and what a CACHED step computes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

import lbridge
from lbridge.calibration import lora
from lbridge.calibration.trajectories import load_trajectories
from lbridge.commands import calibrate, collect
from lbridge.commands.setup import build_adapter, build_method, plan
from lbridge.config import CONF_DIR
from lbridge.errors import LbridgeError
from lbridge.methods.learnibridge import MergedBridge
from lbridge.prompts import load_prompts
from lbridge.runs import calibration_dir
from lbridge.runtime.hooks import CallCounterHook, register, remove_all
from lbridge.runtime.schedule import Schedule

# Every third step FULL: enough cached steps to learn from, small enough for CI.
OVERRIDES = ["model=tiny", "model.device=cpu", "method=learnibridge", "ratio=1", "schedule.interval=3",
             "method.calibration.steps=150", "method.rank=4", "method.alpha=4"]  # fmt: skip


def config(tmp_path, *extra: str, command: str = "calibrate"):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(command, [*OVERRIDES, f"output_root={tmp_path}", *extra])


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """One real calibration run on the tiny model (5 prompts, seeds 1000+), shared by the tests below."""
    root = tmp_path_factory.mktemp("lb")
    cfg = config(root)
    adapter = build_adapter(cfg)
    pipe = adapter.load_pipeline()
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    flags = {k: p.requires_grad for k, p in pipe.transformer.named_parameters()}
    out = calibrate.run(cfg)
    return cfg, out, before, flags


def planned(cfg, pipe=None):
    adapter = build_adapter(cfg)
    pipe = pipe or adapter.load_pipeline()
    method = build_method(cfg.method)
    acc = plan(pipe, adapter, method, cfg, "a handwritten digit 0")
    return adapter, pipe, method, acc


def test_training_pairs_link_each_cached_step_to_its_last_full_step(calibrated):
    cfg, out, _, _ = calibrated
    root = collect.trajectory_dir(cfg, 1000, "float32")[0]
    (trajectory,) = load_trajectories(root, [0])
    pairs = lora.training_pairs([trajectory], Schedule.parse("FccFcF"))
    assert [(p.branch, p.source, p.step) for p in pairs] == [
        (b, f, s) for b in ("cond", "uncond") for f, s in ((0, 1), (0, 2), (3, 4))
    ]


def test_conditioning_is_stored_on_change_and_read_back_at_every_step(calibrated):
    cfg, _, _, _ = calibrated
    root = collect.trajectory_dir(cfg, 1000, "float32")[0]
    (trajectory,) = load_trajectories(root, [1])
    shard_keys = set(trajectory._keys)
    assert "cond/000/cond.image_rotary_emb.0" in shard_keys
    assert "cond/005/cond.image_rotary_emb.0" not in shard_keys  # the same rotary table is stored once
    first, later = trajectory.condition("cond", 0), trajectory.condition("cond", 5)
    assert torch.equal(first["image_rotary_emb"][1], later["image_rotary_emb"][1])
    assert not torch.equal(first["temb"], later["temb"])  # the timestep embedding changes every step


def test_the_manifest_refuses_a_trajectory_set_of_another_model(calibrated):
    cfg, _, _, _ = calibrated
    root = collect.trajectory_dir(cfg, 1000, "float32")[0]
    with pytest.raises(LbridgeError, match="collected with model='tiny', not 'flux'"):
        load_trajectories(root, [0], {"model": "flux"})
    with pytest.raises(LbridgeError, match=r"lack prompts \[7\]"):
        load_trajectories(root, [0, 7])


def test_lora_touches_only_the_final_block(calibrated):
    cfg, out, before, flags = calibrated
    adapter, pipe, method, acc = planned(cfg)
    method.load_calibration(out, pipe.transformer, acc.schedule)
    after = pipe.transformer.state_dict()
    assert before.keys() == after.keys()  # no LoRA layer inside the pipeline's transformer
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert flags == {k: p.requires_grad for k, p in pipe.transformer.named_parameters()}
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert files == ["shared.safetensors"]
    from safetensors import safe_open

    with safe_open(str(out / files[0]), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("single_transformer_blocks.3.") and ".lora_" in k for k in keys)


def test_saved_adapter_reproduces_the_calibrated_samples_exactly(calibrated, tmp_path):
    cfg, out, _, _ = calibrated
    images = []
    for _ in range(2):  # two independent loads of the artifact, fresh pipelines
        adapter, pipe, method, acc = planned(cfg)
        method.load_calibration(out, pipe.transformer, acc.schedule)
        acc.attach()
        images.append(np.asarray(adapter.generate(pipe, "a handwritten digit 4", 7)))
        acc.remove()
    assert np.array_equal(images[0], images[1])
    # ...and the adapter matters: the zero-initialised bridge gives another image.
    adapter, pipe, method, acc = planned(cfg)
    acc.attach()
    uncalibrated = np.asarray(adapter.generate(pipe, "a handwritten digit 4", 7))
    assert not np.array_equal(images[0], uncalibrated)


def final_block_call(adapter, pipe) -> tuple[tuple, dict]:
    """The final block's arguments at the first step of a full-compute sample."""
    calls = []
    final = adapter.blocks(pipe.transformer)[-1]
    handle = final.register_forward_pre_hook(lambda m, a, k: calls.append((a, k)), with_kwargs=True)
    try:
        adapter.generate(pipe, "a handwritten digit 1", 0)
    finally:
        handle.remove()
    return calls[0]


def first(output):
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def test_the_merged_bridge_computes_what_peft_computes_and_follows_every_weight_change(calibrated):
    cfg, out, before, _ = calibrated
    adapter, pipe, method, acc = planned(cfg)
    method.load_calibration(out, pipe.transformer, acc.schedule)
    final = adapter.blocks(pipe.transformer)[-1]
    bridge = method.prepare_bridge(pipe.transformer, adapter, acc.schedule)
    lora.activate(bridge, lora.SHARED)
    args, kwargs = final_block_call(adapter, pipe)
    runner = MergedBridge(final, bridge)
    merged = runner(lora.SHARED)
    calibrated_output = first(merged(*args, **kwargs))
    torch.testing.assert_close(calibrated_output, first(bridge(*args, **kwargs)), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(calibrated_output, first(final(*args, **kwargs)), atol=1e-4)
    assert all(torch.equal(before[k], v) for k, v in pipe.transformer.state_dict().items())
    for _, layer in lora.lora_layers(bridge, lora.SHARED):  # e.g. another optimiser step
        layer.lora_B[lora.SHARED].weight.mul_(2)
    assert runner(lora.SHARED) is merged  # re-merged in place: a compiled forward is kept
    changed = first(merged(*args, **kwargs))
    torch.testing.assert_close(changed, first(bridge(*args, **kwargs)), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(changed, calibrated_output, atol=1e-4)


@torch.no_grad()
def test_the_merged_copy_swaps_in_each_adapter_and_is_the_plain_block_for_an_absent_one():
    from lbridge.bench.models import CONFIGS, DenoisingLoop, build_transformer

    config = CONFIGS["flux-tiny"]
    transformer = build_transformer(config, torch.device("cpu"), torch.float32)
    final = transformer.single_transformer_blocks[-1]
    calls = []
    handle = final.register_forward_pre_hook(lambda m, a, k: calls.append((a, k)), with_kwargs=True)
    DenoisingLoop(transformer, config, torch.device("cpu"), torch.float32)(1)
    handle.remove()
    args, kwargs = calls[0]
    bridge = lora.make_bridge(final)
    for name in ("offset_1", "offset_2"):
        lora.add_lora(bridge, name, 4, 4, lora.lora_targets(final))
        for _, layer in lora.lora_layers(bridge, name):
            layer.lora_B[name].weight.normal_(0, 0.05)
    runner = MergedBridge(final, bridge)
    for name in ("offset_1", "offset_2", "offset_1"):
        lora.activate(bridge, name)
        expected = first(bridge(*args, **kwargs))
        torch.testing.assert_close(first(runner(name)(*args, **kwargs)), expected, rtol=1e-5, atol=1e-5)
    assert runner("offset_1") is runner("offset_2")  # one module: regional compilation covers all
    plain = first(final(*args, **kwargs))
    assert torch.equal(first(runner("offset_3")(*args, **kwargs)), plain)  # no such adapter: the block


def test_merging_or_not_is_a_sampling_choice_that_shares_one_calibration(tmp_path):
    default = calibration_dir(config(tmp_path))
    assert calibration_dir(config(tmp_path, "method.merge=false")) == default
    assert calibration_dir(config(tmp_path, "method.rank=8", "method.alpha=8")) != default


def test_sampling_merged_or_through_peft_gives_the_same_image(calibrated):
    cfg, out, _, _ = calibrated
    images = []
    for merge in (True, False):
        adapter, pipe, method, acc = planned(config(cfg.output_root, f"method.merge={merge}"))
        method.load_calibration(out, pipe.transformer, acc.schedule)
        acc.attach()
        images.append(np.asarray(adapter.generate(pipe, "a handwritten digit 4", 7), dtype=np.int16))
        acc.remove()
    assert np.abs(images[0] - images[1]).max() <= 1


def test_calibrating_again_gives_the_same_adapter_whatever_ran_before(calibrated, tmp_path):
    cfg, out, _, _ = calibrated
    torch.manual_seed(12345)  # another global RNG state than the fixture's
    torch.rand(1000)
    again = calibrate.run(config(tmp_path))
    first, second = (load_file(str(d / "shared.safetensors")) for d in (out, again))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def held_out_error(cfg, out, adapter, pipe, load: bool) -> float:
    """Teacher-forced MSE of the transformer output at CACHED steps, on held-out seeds 0..4."""
    method = build_method(cfg.method)
    acc = plan(pipe, adapter, method, cfg, "a handwritten digit 0")
    if load:
        method.load_calibration(out, pipe.transformer, acc.schedule)
    held_out = load_prompts(cfg.prompts, 5, 0)
    root = collect.collect_trajectories(cfg, adapter, pipe, held_out, 0, "float32")
    pairs = lora.training_pairs(load_trajectories(root, list(range(5))), acc.schedule)
    bridge = method.prepare_bridge(pipe.transformer, adapter, acc.schedule)
    lora.activate(bridge, lora.SHARED)
    head = lambda hidden, arguments: adapter.head(pipe.transformer, hidden, arguments)  # noqa: E731
    return lora.mean_loss(bridge, lora.PairLoader(bridge), pairs, 16, head)


def test_calibration_lowers_held_out_error_against_the_reference(calibrated):
    cfg, out, _, _ = calibrated
    adapter = build_adapter(cfg)
    pipe = adapter.load_pipeline()
    uncalibrated = held_out_error(cfg, out, adapter, pipe, load=False)
    calibrated_error = held_out_error(cfg, out, adapter, pipe, load=True)
    assert calibrated_error < 0.9 * uncalibrated


def test_a_cached_step_runs_only_the_final_block_and_counts_it(tiny):
    adapter, pipe = tiny
    blocks = adapter.blocks(pipe.transformer)
    counters = [register(b, CallCounterHook(), "test.count") for b in blocks]
    try:
        acc = lbridge.accelerate(
            pipe, "learnibridge", 3.0, adapter=adapter, prompt="a cat", **adapter.pipeline_kwargs()
        )
        for c in counters:
            c.count = 0
        adapter.generate(pipe, "a handwritten digit 2", 0)
        acc.remove()
    finally:
        remove_all(pipe.transformer, ["test.count"])
    steps, full = len(acc.schedule), acc.schedule.num_full
    assert [c.count for c in counters[:-1]] == [2 * full] * (len(blocks) - 1)  # cond + uncond
    assert counters[-1].count == 2 * full  # the original final block: FULL steps only (the bridge is a copy)
    # A CACHED step costs embeddings + one block + head: more than FORA's reuse, far less than FULL.
    assert 0.1 < acc.cost.cached / acc.cost.full < 0.3
    assert acc.flops_ratio >= 3.0 and acc.runtime.cached_calls == 2 * (steps - full)


def test_sampling_without_calibration_names_the_command_to_run(tmp_path):
    cfg = config(tmp_path, "num_prompts=1", command="sample")
    adapter, pipe, method, acc = planned(cfg)
    with pytest.raises(LbridgeError, match="no learnibridge calibration at .*run `lbridge calibrate`"):
        method.load_calibration(calibration_dir(cfg), pipe.transformer, acc.schedule)


def test_an_artifact_of_another_schedule_is_refused(calibrated):
    cfg, out, _, _ = calibrated
    adapter, pipe, method, acc = planned(cfg)
    with pytest.raises(LbridgeError, match="was calibrated for schedule FFccFccFcc"):
        method.load_calibration(out, pipe.transformer, Schedule.parse("FcF" * 6 + "cc"))


@pytest.mark.parametrize(
    "params,message",
    [
        ({"adapters": "each"}, "unknown method.adapters 'each' (accepted: shared, per_offset)"),
        ({"rank": 0}, "method.rank=0 must be an integer >= 1"),
        ({"loss": "l1"}, "unknown method.loss 'l1' (accepted: block, normed, head)"),
        ({"calibration": {"train_on": "both"}}, "unknown method.calibration.train_on 'both'"),
        ({"merge": "yes"}, "method.merge='yes' must be true or false"),
    ],
)
def test_bad_parameters_are_clear_errors(params, message):
    with pytest.raises(LbridgeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        lbridge.methods.load_method("learnibridge", **params)


def test_low_rank_statistics_on_known_matrices():
    from lbridge.calibration import correction

    rank_one = torch.outer(torch.arange(1.0, 7.0), torch.tensor([1.0, 2.0, 0.0, 0.0])).double()
    values, directions = correction.top_subspace(rank_one, 1)
    assert correction.effective_rank(values) == pytest.approx(1.0)
    assert correction.energy_rank(values, 0.99) == 1
    assert correction.effective_rank(torch.ones(4)) == pytest.approx(4.0)  # a flat spectrum
    e = torch.eye(4, dtype=torch.float64)
    assert correction.subspace_overlap(directions, directions) == pytest.approx(1.0)
    assert correction.subspace_overlap(e[:, :2], e[:, 2:]) == pytest.approx(0.0)  # orthogonal planes
    angles = correction.principal_angles(e[:, :1], (e[:, :1] + e[:, 1:2]) / 2**0.5)
    assert float(angles[0]) == pytest.approx(torch.pi / 4)
