"""Every model family through lbridge: discovery, final block, methods, bit-identity, head, offline errors.

Each family runs as a tiny random-weight pipeline of its real diffusers classes (conftest `FAMILIES`).
"""

import numpy as np
import pytest
import torch
from conftest import FAMILIES
from helpers import unread_modules_run
from PIL import Image

import lbridge
from lbridge.calibration.trajectories import bind_block_arguments, block_hidden_output
from lbridge.errors import LbridgeError
from lbridge.media import tile_frames, write_sample
from lbridge.methods.base import available_methods, method_class
from lbridge.metrics.reference import psnr, ssim
from lbridge.models import adapter_for, load_adapter
from lbridge.runtime.hooks import CallCounterHook, ModelHook, register, remove_all

FINAL_BLOCK = {
    "hunyuan_video": lambda t: t.single_transformer_blocks[-1],
    "wan21_1_3b": lambda t: t.blocks[-1],
    "qwen_image": lambda t: t.transformer_blocks[-1],
    "pixart_alpha": lambda t: t.transformer_blocks[-1],
    "dit_xl_2": lambda t: t.transformer_blocks[-1],
}
HUB_IDS = {
    "hunyuan_video": "hunyuanvideo-community/HunyuanVideo",
    "wan21_1_3b": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
    "wan21_14b": "Wan-AI/Wan2.1-T2V-14B-Diffusers",
    "qwen_image": "Qwen/Qwen-Image",
    "pixart_alpha": "PixArt-alpha/PixArt-XL-2-1024-MS",
    "dit_xl_2": "facebook/DiT-XL-2-256",
}
WITH_HEAD = {"hunyuan_video", "qwen_image", "dit_xl_2"}  # the others' head needs values blocks never see
PROMPT = {"dit_xl_2": "goldfish"}  # DiT is class-conditional


def prompt_of(name: str) -> str:
    return PROMPT.get(name, "a red cat")


def raw(adapter, pipe, name: str, seed: int = 0) -> np.ndarray:
    """The pipeline's output as an array (images, or a video's frames), same seed every call."""
    torch.manual_seed(seed)  # DDPM-style schedulers draw step noise from the global RNG
    kwargs = {
        **adapter.prompt_kwargs(pipe, prompt_of(name)),
        **adapter.pipeline_kwargs(),
        "output_type": "np",
    }
    out = pipe(**kwargs, generator=adapter.generator(seed))
    return np.asarray(out.frames if hasattr(out, "frames") else out.images)


def accelerate(adapter, pipe, name, method, ratio=1.0, interval=None, **params):
    call = {**adapter.prompt_kwargs(pipe, prompt_of(name)), **adapter.pipeline_kwargs()}
    return lbridge.accelerate(
        pipe, method, ratio, adapter=adapter, interval=interval, method_params=params, **call
    )


def test_adapter_is_discovered_and_final_block_is_documented(random_family):
    name, adapter, pipe = random_family
    assert adapter_for(pipe.transformer) is type(adapter)
    blocks = adapter.blocks(pipe.transformer)
    assert blocks[-1] is FINAL_BLOCK[name](pipe.transformer)
    assert all(adapter.attn_mlp_sites(block) for block in blocks)


STATIC = [m for m in available_methods() if not getattr(method_class(m), "adaptive", False)]
ADAPTIVE = [m for m in available_methods() if getattr(method_class(m), "adaptive", False)]
METHODS = [(m, {}) for m in STATIC] + [("fora", {"site": "attn_mlp"})]
#: Parameters that let an adaptive method run without `lbridge calibrate` (nothing left to fit).
UNFITTED = {"teacache": {"coefficients": None}, "magcache": {"mag_ratios": [1.0] + [1.1] * 99}}


@pytest.mark.parametrize("method,params", METHODS, ids=[f"{m}-{p.get('site', '')}" for m, p in METHODS])
def test_every_method_generates_an_output_of_the_reference_shape(random_family, method, params):
    # learnibridge runs uncalibrated here (zero-initialised LoRA = the final block on the stale input).
    name, adapter, pipe = random_family
    reference = raw(adapter, pipe, name)
    acc = accelerate(adapter, pipe, name, method, interval=2, **params)  # F C F C
    try:
        accelerated = raw(adapter, pipe, name)
        cached_calls = acc.runtime.cached_calls
    finally:
        acc.remove()
    assert accelerated.shape == reference.shape and np.isfinite(accelerated).all()
    schedule = acc.schedule
    assert (method == "none") == (schedule.num_full == len(schedule))
    assert cached_calls == (len(schedule) - schedule.num_full) * calls_per_step(name)


def calls_per_step(name: str) -> int:
    """Transformer calls per step: CFG as two named calls (Wan, Qwen) or one batched/distilled call."""
    return 2 if name in ("wan21_1_3b", "qwen_image") else 1


@pytest.mark.parametrize(
    "method,params",
    [("none", {}), ("fora", {"site": "stack"}), ("fora", {"site": "attn_mlp"}),
     ("taylorseer", {"site": "attn_mlp"}), ("foca", {"site": "stack"}), ("learnibridge", {}), ("toca", {})],
)  # fmt: skip
def test_all_full_schedule_is_bit_identical_to_the_plain_pipeline(random_family, method, params):
    name, adapter, pipe = random_family
    plain = raw(adapter, pipe, name)
    acc = accelerate(adapter, pipe, name, method, 1.0, **params)
    try:
        assert str(acc.schedule) == "F" * len(acc.schedule)
        hooked = raw(adapter, pipe, name)
    finally:
        acc.remove()
    assert np.array_equal(plain, hooked)


def test_every_family_with_a_rotary_module_computes_it_once_per_branch(random_family):
    """lbridge/runtime/rotary.py; FLUX: tests/test_rotary.py."""
    name, adapter, pipe = random_family
    acc = accelerate(adapter, pipe, name, "fora", 2.0)
    try:
        raw(adapter, pipe, name)
        hooks = acc.rotary.hooks
        computed = hooks[0].computed if hooks else None
    finally:
        acc.remove()
    if name in ("hunyuan_video", "wan21_1_3b"):  # Qwen-Image caches its own; PixArt and DiT have none
        assert computed == calls_per_step(name)
    else:
        assert hooks == []


@pytest.mark.parametrize("method", ["fora", "learnibridge"])
def test_a_stack_methods_cached_calls_leave_the_text_embedders_unrun_with_the_same_output(
    random_family, method
):
    """CacheMethod.reuse_block_only_modules: outside the blocks nothing reads what they return."""
    name, adapter, pipe = random_family
    acc = accelerate(adapter, pipe, name, method, interval=2)  # F c F c
    runs, full_calls, same = unread_modules_run(acc, adapter, pipe, lambda: raw(adapter, pipe, name))
    assert (runs == []) == (name == "dit_xl_2")  # DiT is class-conditional: no text stream
    assert runs == [full_calls] * len(runs) and full_calls < len(acc.schedule) * calls_per_step(name)
    assert same


def test_magcache_decides_before_the_text_embedders_and_its_cached_calls_leave_them_unrun(random_family):
    """Its verdict needs no probe, so it is taken before the call's embedders run: same output."""
    name, adapter, pipe = random_family
    acc = accelerate(adapter, pipe, name, "magcache", threshold=float("inf"), **UNFITTED["magcache"])
    runs, full_calls, same = unread_modules_run(acc, adapter, pipe, lambda: raw(adapter, pipe, name))
    assert (runs == []) == (name == "dit_xl_2")
    assert runs == [full_calls] * len(runs) and full_calls < len(acc.schedule) * calls_per_step(name)
    assert same


def test_magcache_refuses_a_call_whose_early_verdict_diffusers_does_not_share(random_family):
    name, adapter, pipe = random_family
    if name == "dit_xl_2":
        pytest.skip("DiT has no text embedders: no verdict is taken early")
    acc = accelerate(adapter, pipe, name, "magcache", threshold=float("inf"), **UNFITTED["magcache"])
    method = acc.method
    method.would_skip = lambda state: not type(method).would_skip(method, state)  # a diverging copy
    try:
        acc.reset()
        with pytest.raises(RuntimeError, match="differs from the one taken before the blocks"):
            raw(adapter, pipe, name)
    finally:
        acc.remove()


#: Families whose first block's probed inputs come out of modules that run before their text
#: embedders (Wan's blocks get `time_proj`'s output as a view; DiT has no text stream).
TEACACHE_EARLY = {"hunyuan_video", "wan21_1_3b", "qwen_image", "pixart_alpha"}


def test_teacache_decides_before_the_text_embedders_where_its_probe_inputs_come_first(random_family):
    """The verdict of every call is the one the first block would give: same realised FULL calls,
    bit-identical output, and CACHED calls that leave the text embedders unrun."""
    name, adapter, pipe = random_family
    assert bool(adapter.probe_sources(pipe.transformer)) == (name in TEACACHE_EARLY)
    acc = accelerate(adapter, pipe, name, "teacache", threshold=float("inf"), **UNFITTED["teacache"])
    if name not in TEACACHE_EARLY:  # its verdict waits for the first block: the embedders always run
        modules = adapter.block_only_modules(pipe.transformer)
        hooks = [n for m in modules if hasattr(m, "_diffusers_hook") for n in m._diffusers_hook.hooks]
        acc.remove()
        assert not [n for n in hooks if n.startswith("lbridge.teacache")]
        return
    acc.method.threshold = threshold_between_candidates(acc, lambda: raw(adapter, pipe, name))
    runs, full_calls, same = unread_modules_run(acc, adapter, pipe, lambda: raw(adapter, pipe, name))
    assert full_calls == (len(acc.schedule) - 1) * calls_per_step(name)  # F c F F: one step skipped
    assert runs == [full_calls] * len(runs)
    assert same


def threshold_between_candidates(acc, generate) -> float:
    """A TeaCache threshold (raw distances) that skips the first candidate step and not the second:
    above its distance, under the sum of the two, on every branch."""
    acc.method.recorded_distances = recorded = []
    acc.reset()
    generate()
    acc.method.recorded_distances = None
    first, second = [s for s in range(len(acc.schedule)) if not acc.schedule.is_full(s)][:2]
    one = {b: d for b, s, d in recorded if s == first}
    two = {b: one[b] + d for b, s, d in recorded if s == second}
    assert max(one.values()) < min(two.values())
    return (max(one.values()) + min(two.values())) / 2


def test_teacache_runs_the_text_embedders_at_a_call_whose_probe_inputs_did_not_all_come(random_family):
    name, adapter, pipe = random_family
    if name not in TEACACHE_EARLY:
        pytest.skip("its verdict is always taken at the first block")
    reference = raw(adapter, pipe, name)
    acc = accelerate(adapter, pipe, name, "teacache", threshold=float("inf"), **UNFITTED["teacache"])
    modules = adapter.block_only_modules(pipe.transformer)
    counters = [register(m, CallCounterHook(), "test.count") for m in modules]
    first_source = next(iter(adapter.probe_sources(pipe.transformer).values()))
    try:
        remove_all(first_source, [n for n in first_source._diffusers_hook.hooks if ".tap." in n])
        acc.reset()
        accelerated = raw(adapter, pipe, name)
        calls = acc.runtime.full_calls + acc.runtime.cached_calls
    finally:
        acc.remove()
        remove_all(pipe.transformer, ["test.count"])
    assert acc.runtime.cached_calls > 0
    assert [c.count for c in counters] == [calls] * len(counters)
    assert accelerated.shape == reference.shape


def test_teacache_on_flux_decides_before_the_t5_projection(random_flux):
    """FLUX (and the tiny model) make the patch and step embeddings before the text projection: same
    verdicts, bit-identical output, and CACHED calls that leave the projection unrun."""
    adapter, pipe = random_flux
    acc = accelerate(adapter, pipe, "flux", "teacache", threshold=float("inf"), **UNFITTED["teacache"])
    acc.method.threshold = threshold_between_candidates(acc, lambda: raw(adapter, pipe, "flux"))
    runs, full_calls, same = unread_modules_run(acc, adapter, pipe, lambda: raw(adapter, pipe, "flux"))
    assert 0 < full_calls < len(acc.schedule)
    assert runs == [full_calls]
    assert same


def test_teacache_on_flux_with_batched_modulation_decides_at_the_first_block(random_flux):
    """Batched, the step embedding is answered from a table by a hook outside TeaCache's tap, which
    never fires (the table's build bypasses it): the verdict waits for the first block, the text
    projection runs at every call, and the sample is the per-step one up to the batched rounding."""
    adapter, pipe = random_flux
    call = {**adapter.prompt_kwargs(pipe, prompt_of("flux")), **adapter.pipeline_kwargs()}
    params, samples, calls = {"threshold": float("inf"), **UNFITTED["teacache"]}, {}, {}
    for modulation in ("per_step", "batched"):
        acc = lbridge.accelerate(
            pipe, "teacache", 1.0, adapter=adapter, modulation=modulation, method_params=params, **call
        )
        acc.remove()  # the counter goes under lbridge's hooks: it counts what really runs
        counter = register(pipe.transformer.context_embedder, CallCounterHook(), "test.count")
        try:
            acc.attach()
            acc.reset()
            samples[modulation] = raw(adapter, pipe, "flux")
            calls[modulation] = (counter.count, acc.runtime.full_calls, acc.runtime.cached_calls)
        finally:
            acc.remove()
            remove_all(pipe.transformer, ["test.count"])
    (runs, full, cached), batched = calls["per_step"], calls["batched"]
    assert cached > 0 and runs == full  # per step: the early verdict spares the projection
    assert batched == (full + cached, full, cached)  # batched: the same verdicts, taken at the block
    np.testing.assert_allclose(samples["batched"], samples["per_step"], atol=1e-5)


class _BlockArgument(ModelHook):
    """Keeps (branch, step, argument) of every call of the block it is on."""

    def __init__(self, runtime, argument: str) -> None:
        super().__init__()
        self.runtime, self.argument, self.calls = runtime, argument, []

    def pre_forward(self, module, *args, **kwargs):
        value = bind_block_arguments(module, args, kwargs)[self.argument]
        self.calls.append((self.runtime.branch, self.runtime.step, value.clone()))
        return args, kwargs


def test_teacache_on_wan_measures_the_step_modulation_as_teacache4wan21_does(random_family):
    """Wan's indicator is the blocks' `temb`, the step's modulation vectors (TeaCache4Wan2.1's `e0`,
    float32): every distance is its relative L1 change since the branch's last call, the same
    whatever the sample, since it depends on the timestep alone."""
    name, adapter, pipe = random_family
    if name != "wan21_1_3b":
        pytest.skip("Wan's reference TeaCache is the one that measures the timestep modulation alone")
    acc = accelerate(adapter, pipe, name, "teacache", threshold=float("inf"), **UNFITTED["teacache"])
    first = adapter.blocks(pipe.transformer)[0]
    temb = register(first, _BlockArgument(acc.runtime, "temb"), "test.temb")  # outermost: every call
    recorded = []
    try:
        for seed in (0, 1):
            acc.method.recorded_distances = distances = []
            acc.reset()
            raw(adapter, pipe, name, seed=seed)
            recorded.append(distances)
    finally:
        acc.method.recorded_distances = None
        acc.remove()
        remove_all(first, ["test.temb"])
    previous, expected = {}, []
    for branch, step, value in temb.calls[: len(temb.calls) // 2]:
        if branch in previous:
            before = previous[branch].float()
            distance = (value.float() - before).abs().mean() / before.abs().mean()
            expected.append((branch, step, float(distance)))
        previous[branch] = value
    assert [(b, s) for b, s, _ in recorded[0]] == [(b, s) for b, s, _ in expected]
    assert [d for *_, d in recorded[0]] == pytest.approx([d for *_, d in expected], rel=1e-6)
    assert recorded[1] == recorded[0]


class _Cloning(dict):
    def __setitem__(self, key, value):
        super().__setitem__(key, value.clone())


def test_teacache_refuses_an_early_verdict_on_tensors_the_first_block_does_not_receive(random_family):
    name, adapter, pipe = random_family
    if name not in TEACACHE_EARLY:
        pytest.skip("its verdict is always taken at the first block")
    acc = accelerate(adapter, pipe, name, "teacache", threshold=float("inf"), **UNFITTED["teacache"])
    acc.method.probe.tapped = cloning = _Cloning()  # equal values, not the tensors the block gets
    for source in adapter.probe_sources(pipe.transformer).values():
        for hook_name, hook in source._diffusers_hook.hooks.items():
            if ".tap." in hook_name:
                hook.store = cloning
    try:
        acc.reset()
        with pytest.raises(RuntimeError, match="is not the output of the module"):
            raw(adapter, pipe, name)
    finally:
        acc.remove()


@pytest.mark.parametrize("method", ADAPTIVE)
def test_adaptive_methods_skip_every_candidate_at_infinite_threshold(random_family, method):
    name, adapter, pipe = random_family
    reference = raw(adapter, pipe, name)
    acc = accelerate(adapter, pipe, name, method, 1.0, threshold=float("inf"), **UNFITTED.get(method, {}))
    try:
        acc.reset()
        accelerated = raw(adapter, pipe, name)
    finally:
        acc.remove()
    assert accelerated.shape == reference.shape and np.isfinite(accelerated).all()
    candidates = acc.schedule  # FULL where forced; CACHED marks the steps the method may skip
    if method == "magcache":  # at most max_skip_steps (3) skipped in a row, then one FULL step
        assert acc.runtime.cached_calls > 0
    else:
        assert acc.runtime.realised_schedule() == str(candidates)
        assert acc.runtime.cached_calls == candidates.num_cached * calls_per_step(name)


@pytest.mark.parametrize("method", ADAPTIVE)
def test_adaptive_methods_at_threshold_zero_are_bit_identical_to_the_plain_pipeline(random_family, method):
    name, adapter, pipe = random_family
    plain = raw(adapter, pipe, name)
    acc = accelerate(adapter, pipe, name, method, 1.0, threshold=0.0, **UNFITTED.get(method, {}))
    try:
        acc.reset()
        hooked = raw(adapter, pipe, name)
        assert acc.runtime.realised_schedule() == "F" * len(acc.schedule)
    finally:
        acc.remove()
    assert np.array_equal(plain, hooked)


def test_context_follows_the_scheduler_with_the_pipelines_branches(random_family):
    name, adapter, pipe = random_family
    acc = accelerate(adapter, pipe, name, "fora", interval=2)
    seen = []
    original = acc.runtime.enter_call

    def spy(branch):
        context = original(branch)
        seen.append((context.name, context.step_index))
        return context

    acc.runtime.enter_call = spy
    try:
        raw(adapter, pipe, name)
    finally:
        acc.remove()
    steps = range(len(acc.schedule))
    # PixArt and DiT batch CFG into one unnamed call (branch `default`); DiT's DDIM has no step_index.
    branches = {"wan21_1_3b": ["cond", "uncond"], "qwen_image": ["cond", "uncond"], "hunyuan_video": ["cond"]}
    assert seen == [(b, s) for s in steps for b in branches.get(name, ["default"])]


class _Record(ModelHook):
    def __init__(self):
        super().__init__()
        self.calls = []

    def new_forward(self, module, *args, **kwargs):
        output = self.fn_ref.original_forward(*args, **kwargs)
        self.calls.append((bind_block_arguments(module, args, kwargs), block_hidden_output(module, output)))
        return output


def test_head_reproduces_the_transformer_output_from_the_final_block(random_family):
    name, adapter, pipe = random_family
    final = adapter.blocks(pipe.transformer)[-1]
    if name not in WITH_HEAD:
        with pytest.raises(LbridgeError, match="does not define its head"):
            adapter.head(pipe.transformer, torch.zeros(1), {})
        return
    record = register(final, _Record(), "test.record")
    outputs = []
    handle = pipe.transformer.register_forward_hook(lambda m, a, out: outputs.append(out[0]))
    try:
        raw(adapter, pipe, name)
    finally:
        handle.remove()
        remove_all(pipe.transformer, ["test.record"])
    with torch.no_grad():
        arguments, hidden = record.calls[-1]
        head = adapter.head(pipe.transformer, hidden, arguments)
    # The head works on tokens, the transformer returns unpatchified latents: the same numbers, reordered.
    expected = outputs[-1]
    assert head.numel() == expected.numel()
    torch.testing.assert_close(head.flatten().sort().values, expected.flatten().sort().values)


@pytest.mark.parametrize("name", list(HUB_IDS))
def test_without_weights_offline_the_error_names_model_path(name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LbridgeError, match="model.path") as err:
        load_adapter(name, device="cpu").load_pipeline()
    assert HUB_IDS[name] in str(err.value) and "\n" not in str(err.value)


def test_random_weights_configs_cover_every_family():
    assert set(FAMILIES) | {"wan21_14b"} == set(HUB_IDS)


def test_dit_prompt_is_a_class_id_or_name():
    adapter = load_adapter("dit_xl_2", random_weights=True, dtype="float32", device="cpu")
    pipe = adapter.load_pipeline()
    assert adapter.prompt_kwargs(pipe, "3") == {"class_labels": [3]}
    assert adapter.prompt_kwargs(pipe, "goldfish") == {"class_labels": [1]}
    with pytest.raises(LbridgeError, match=r"'a red cat' is not a class \(accepted: an integer 0..999"):
        adapter.prompt_kwargs(pipe, "a red cat")


def test_video_samples_are_tiled_frames_that_the_metrics_compare(tmp_path):
    frames = [Image.new("RGB", (8, 6), (10 * i, 0, 0)) for i in range(5)]
    grid = tile_frames(frames)
    assert grid.size == (3 * 8, 2 * 6) and grid.getpixel((8, 0)) == (10, 0, 0)  # frame 1: row 0, column 1
    record = write_sample(tmp_path, 7, frames, fps=8)
    assert record["file"] == "00007.png" and record["frames"] == 5 and (tmp_path / record["video"]).exists()
    stored = Image.open(tmp_path / record["file"])
    assert psnr(stored, grid) == float("inf") and ssim(stored, grid) == pytest.approx(1.0)


def test_imagenet_prompts_cycle_class_ids():
    from lbridge.prompts.readers import ClassIdPrompts

    assert ClassIdPrompts(num_classes=3, offset=1).texts(4) == ["1", "2", "0", "1"]


@pytest.mark.parametrize("method", ["l2p", "tcc", "learnibridge"])
def test_calibrated_methods_calibrate_on_every_family(random_family, method, tmp_path):
    """collect + calibrate end to end on the family's tiny pipeline (the same one `random_family` built)."""
    from hydra import compose, initialize_config_dir

    from lbridge.calibration.job import METADATA
    from lbridge.commands import calibrate
    from lbridge.config import CONF_DIR

    name, _, pipe = random_family
    sizes = [f"model.{k}={v}" for k, v in FAMILIES[name].items()]
    extra = {"learnibridge": ["method.calibration.steps=5", "method.rank=2", "method.alpha=2"]}.get(
        method, []
    )
    if method == "learnibridge" and name not in WITH_HEAD:
        extra.append("method.loss=block")
    overrides = [f"model={name}", "model.random_weights=true", "model.dtype=float32", "model.device=cpu",
                 "model.num_inference_steps=4", *sizes, f"method={method}", "ratio=1", "schedule.interval=2",
                 "method.calibration.num_prompts=2", f"output_root={tmp_path}", *extra]  # fmt: skip
    if name == "dit_xl_2":
        overrides.append("prompts=imagenet")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("calibrate", overrides)
    out = calibrate.run(cfg)
    assert (out / METADATA).is_file()
