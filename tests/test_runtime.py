"""Hooks inside unmodified diffusers pipelines: bit-identity when all FULL, fewer block calls when cached."""

import numpy as np
import pytest
import torch
from helpers import unread_modules_run

import lbridge
import lbridge.errors
from lbridge.runtime.hooks import CallCounterHook, register, remove_all


def generate(adapter, pipe, prompt="a handwritten digit 3", seed=0) -> np.ndarray:
    kwargs = {**adapter.pipeline_kwargs(), "output_type": "np"}
    return np.asarray(pipe(prompt, generator=adapter.generator(seed), **kwargs).images)


def accelerate(adapter, pipe, method, ratio, **params):
    return lbridge.accelerate(
        pipe,
        method,
        ratio,
        adapter=adapter,
        prompt="a cat",
        method_params=params,
        **adapter.pipeline_kwargs(),
    )


@pytest.mark.parametrize("model", ["tiny", "random_flux"])
@pytest.mark.parametrize(
    "method,params",
    [
        ("none", {}),
        ("fora", {"site": "stack"}),
        ("fora", {"site": "attn_mlp"}),
        ("taylorseer", {"site": "attn_mlp"}),
        ("learnibridge", {}),
        ("foca", {"site": "stack"}),
        ("foca", {"site": "attn_mlp"}),
        ("toca", {"refresh_ratio": 0.5}),
        ("l2p", {}),
        ("tcc", {"base": "taylorseer"}),
        ("tcc", {"base": "fora", "base_params": {"site": "attn_mlp"}}),
    ],
)
def test_all_full_schedule_is_bit_identical_to_the_plain_pipeline(model, method, params, request):
    adapter, pipe = request.getfixturevalue(model)
    plain = generate(adapter, pipe)
    acc = accelerate(adapter, pipe, method, 1.0, **params)
    try:
        assert str(acc.schedule) == "F" * len(acc.schedule)
        hooked = generate(adapter, pipe)
    finally:
        acc.remove()
    assert np.array_equal(plain, hooked)
    assert np.array_equal(generate(adapter, pipe), plain)  # removal restores the pipeline exactly


def test_fora_at_ratio_3_runs_fewer_blocks_and_reaches_the_flops_ratio(tiny):
    adapter, pipe = tiny
    blocks = adapter.blocks(pipe.transformer)
    # Registered before lbridge's hooks, the counters sit innermost: they count blocks really run.
    counters = [register(b, CallCounterHook(), "test.count") for b in blocks]
    try:
        generate(adapter, pipe)
        none_calls = sum(c.count for c in counters)
        acc = accelerate(adapter, pipe, "fora", 3.0)
        for c in counters:
            c.count = 0
        acc.reset()
        generate(adapter, pipe)
        fora_calls = sum(c.count for c in counters)
        acc.remove()
    finally:
        remove_all(pipe.transformer, ["test.count"])
    steps = len(acc.schedule)
    assert none_calls == 2 * steps * len(blocks)  # cond + uncond at every step
    assert fora_calls == 2 * acc.schedule.num_full * len(blocks) < none_calls
    assert acc.flops_ratio >= 3.0
    assert 3.0 * acc.sample_flops() <= 2 * steps * acc.cost.full  # FLOPs of the calls as they ran


@pytest.mark.parametrize("method", ["fora", "taylorseer", "learnibridge", "tcc"])
def test_a_stack_methods_cached_calls_leave_the_text_projection_unrun_with_the_same_output(
    random_flux, method
):
    """FLUX's `context_embedder` (the T5 projection) feeds the blocks alone (other families:
    test_model_families.py); site=attn_mlp runs the blocks, so it runs too."""
    adapter, pipe = random_flux
    acc = accelerate(adapter, pipe, method, 2.0)
    runs, full_calls, same = unread_modules_run(acc, adapter, pipe, lambda: generate(adapter, pipe))
    assert runs == [full_calls] and full_calls < len(acc.schedule) and same
    acc = accelerate(adapter, pipe, "fora", 2.0, site="attn_mlp")
    try:  # read while attached: removal clears the method's hook list
        installed = [name for name, _ in acc.method._hooks]
    finally:
        acc.remove()
    assert installed and not any(name.endswith(".unread") for name in installed)


def test_fora_attn_mlp_reuses_attention_at_cached_steps(tiny):
    adapter, pipe = tiny
    attn = adapter.blocks(pipe.transformer)[0].attn
    processor_calls = []
    original = attn.processor.__call__

    class Counting(type(attn.processor)):
        def __call__(self, *args, **kwargs):
            processor_calls.append(1)
            return original(*args, **kwargs)

    attn.set_processor(Counting())
    try:
        acc = accelerate(adapter, pipe, "fora", 1.5, site="attn_mlp")
        processor_calls.clear()
        generate(adapter, pipe)
        acc.remove()
    finally:
        attn.set_processor(type(attn.processor).__mro__[1]())
    assert len(processor_calls) == 2 * acc.schedule.num_full


def test_context_follows_the_scheduler_and_cfg_branches(tiny):
    adapter, pipe = tiny
    acc = accelerate(adapter, pipe, "fora", 2.0)
    seen = []
    original = acc.runtime.enter_call

    def spy(branch):
        context = original(branch)
        seen.append((context.name, context.step_index, acc.runtime.is_full))
        return context

    acc.runtime.enter_call = spy
    try:
        generate(adapter, pipe)
    finally:
        acc.remove()
    steps = len(acc.schedule)
    assert [s for s in seen if s[0] == "cond"] == [("cond", i, acc.schedule.full[i]) for i in range(steps)]
    assert [s[1] for s in seen if s[0] == "uncond"] == list(range(steps))


def test_wrong_step_count_is_refused(tiny):
    adapter, pipe = tiny
    acc = accelerate(adapter, pipe, "fora", 2.0)
    try:
        with pytest.raises(lbridge.errors.LbridgeError, match="runs 7 steps"):
            pipe("a handwritten digit 1", num_inference_steps=7, generator=torch.Generator().manual_seed(0))
    finally:
        acc.remove()


def test_removing_hooks_leaves_no_forward_on_the_modules_that_carried_them():
    """diffusers' `remove_hook` leaves the wrapped bound method as an instance `forward`: torch.compile
    guards on it, so a block compiled in one state recompiled in the other. A forward the module
    already had (here a user's wrapper) is kept."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    users_forward = model[1].forward
    model[1].forward = lambda x: users_forward(x)
    for child in model:
        register(child, CallCounterHook(), "lbridge.count")
    remove_all(model, ["lbridge.count"])
    assert "forward" not in model[0].__dict__
    assert "forward" in model[1].__dict__
    x = torch.ones(1, 2)
    assert torch.equal(model(x), model[1](model[0](x)))
