"""The rotary position embedding is computed once per sample and CFG branch, not once per call.

Its inputs are fixed for a sample (FLUX's position ids, the video latent's shape), so the output of
the branch's previous call is reused while they are the same objects, unwritten (lbridge/runtime/rotary.py).
"""

import numpy as np
import pytest
import torch

import lbridge
from lbridge.runtime.context import CacheRuntime, ManualClock
from lbridge.runtime.rotary import RotaryCache
from lbridge.runtime.schedule import Schedule


class Rotary(torch.nn.Module):
    """A stand-in rotary module: its output depends on the call's `ids` and on its buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.tensor(2.0))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return ids * self.scale


class IdsAdapter:
    name = "ids"

    def rotary_embedding(self, transformer):
        return transformer

    def rotary_inputs(self, call, args, kwargs):
        return (call["ids"],) if "ids" in call else None


@pytest.fixture
def rotary():
    """(module, runtime, hook): `module(runtime.call_arguments['ids'])` is a transformer call's rotary."""
    module, runtime = Rotary(), CacheRuntime(ManualClock(4), Schedule.all_full(4))
    cache = RotaryCache(runtime)
    cache.attach(module, IdsAdapter())
    yield module, runtime, cache.hooks[0]
    cache.detach(module)


def call(module, runtime, ids, **arguments):
    runtime.call_arguments = {"ids": ids, **arguments}
    return module(ids)


def test_the_same_unwritten_inputs_reuse_the_output(rotary):
    module, runtime, hook = rotary
    ids = torch.arange(3.0)
    first = call(module, runtime, ids)
    assert call(module, runtime, ids) is first and hook.computed == 1


def test_new_or_written_inputs_or_buffers_compute_it_again(rotary):
    module, runtime, hook = rotary
    ids = torch.arange(3.0)
    call(module, runtime, ids)
    ids.add_(1)  # written in place: its version counter moves
    assert torch.equal(call(module, runtime, ids), 2 * torch.tensor([1.0, 2.0, 3.0]))
    assert torch.equal(call(module, runtime, ids.clone()), 2 * ids)  # equal values, another tensor
    module.scale = torch.tensor(3.0)  # what `.to()` does to a buffer: a new tensor
    assert torch.equal(call(module, runtime, ids), 3 * ids)
    assert hook.computed == 4


def test_each_cfg_branch_keeps_its_own(rotary):
    module, runtime, hook = rotary
    cond, uncond = torch.arange(3.0), torch.arange(4.0)
    for _ in range(3):  # a step: one call per branch
        for branch, ids in (("cond", cond), ("uncond", uncond)):
            runtime.context = runtime.clock.context(branch)
            assert torch.equal(call(module, runtime, ids), 2 * ids)
    assert hook.computed == 2


def test_inputs_it_cannot_vouch_for_are_computed_every_call(rotary):
    module, runtime, hook = rotary
    with torch.inference_mode():  # inference tensors track no version: a write would go unseen
        ids = torch.arange(3.0)
        call(module, runtime, ids)
        call(module, runtime, ids)
    runtime.call_arguments = {}  # the adapter cannot name the inputs (passed positionally)
    module(torch.arange(3.0))
    module(torch.arange(3.0))
    assert hook.computed == 4


def test_a_flux_sample_computes_its_rotary_embedding_once_and_the_same_image(random_flux, monkeypatch):
    adapter, pipe = random_flux
    kwargs = {**adapter.pipeline_kwargs(), "output_type": "np"}

    def sample():
        acc = lbridge.accelerate(pipe, "toca", 3.0, adapter=adapter, prompt="a cat", **kwargs)
        try:
            image = pipe("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images[0]
        finally:
            computed = acc.rotary.hooks[0].computed if acc.rotary.hooks else None
            acc.remove()
        return image, computed

    reused, computed = sample()
    assert computed == 1  # FLUX.1-dev is guidance-distilled: one branch
    monkeypatch.setattr(adapter, "rotary_embedding", lambda transformer: None)
    recomputed, none = sample()
    assert none is None and np.array_equal(reused, recomputed)
