"""`modulation=batched`: every AdaLN modulation computed once per sample for all its steps.

FLUX's and HunyuanVideo's modulations (`norm1.linear`, `norm1_context.linear`, `norm.linear`) are
one-row matmuls of the step embedding: batched, a sample reads their weights once instead of at every
step, and samples what the per-step computation does up to rounding.
"""

import numpy as np
import pytest
import torch
from diffusers.models.normalization import AdaLayerNormZero, AdaLayerNormZeroSingle
from torch.utils._python_dispatch import TorchDispatchMode

import lbridge
from lbridge.errors import LbridgeError
from lbridge.models import load_adapter
from lbridge.models.flux import FluxAdapter

#: The families whose adapters name a step embedding: fixtures of their random pipelines.
BATCHABLE = ["random_flux", "random_hunyuan"]


@pytest.fixture(scope="module")
def random_hunyuan():
    """HunyuanVideo's classes at toy size, 8 steps: its step embedding returns two outputs."""
    adapter = load_adapter("hunyuan_video", random_weights=True, dtype="float32", device="cpu", height=16,
                           width=16, num_frames=5, max_sequence_length=8, num_inference_steps=8)  # fmt: skip
    pipe = adapter.load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return adapter, pipe


class WeightReads(TorchDispatchMode):
    """Counts the matmuls that read each of the given weights (by storage)."""

    def __init__(self, weights: list[torch.Tensor]) -> None:
        super().__init__()
        self.storage = {w.untyped_storage().data_ptr() for w in weights}
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.addmm, torch.ops.aten.mm):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            self.reads += sum(t.untyped_storage().data_ptr() in self.storage for t in tensors)
        return func(*args, **(kwargs or {}))


def modulations(pipe) -> list[torch.nn.Linear]:
    adaln = AdaLayerNormZero | AdaLayerNormZeroSingle
    return [m.linear for m in pipe.transformer.modules() if isinstance(m, adaln)]


def modulation_weights(pipe) -> list[torch.Tensor]:
    return [linear.weight for linear in modulations(pipe)]


def sample(pipe, adapter, method: str, modulation: str, seed: int = 0, **params) -> np.ndarray:
    kwargs = {**adapter.pipeline_kwargs(), "output_type": "np"}
    acc = lbridge.accelerate(pipe, method, 3.0, adapter=adapter, modulation=modulation, method_params=params,
                             prompt="a cat", **kwargs)  # fmt: skip
    try:
        out = pipe("a cat", generator=torch.Generator().manual_seed(seed), **kwargs)
        return np.asarray(out.frames if hasattr(out, "frames") else out.images)[0]
    finally:
        acc.remove()


@pytest.mark.parametrize("model", BATCHABLE)
@pytest.mark.parametrize("method", ["none", "fora", "toca"])
def test_batched_modulation_samples_what_the_per_step_computation_does(request, model, method):
    adapter, pipe = request.getfixturevalue(model)
    per_step, batched = (sample(pipe, adapter, method, m) for m in ("per_step", "batched"))
    np.testing.assert_allclose(batched, per_step, atol=1e-5)


@pytest.mark.parametrize("model", BATCHABLE)
def test_a_sample_reads_each_modulation_weight_once_instead_of_once_per_step(request, model):
    adapter, pipe = request.getfixturevalue(model)
    weights = modulation_weights(pipe)
    steps = adapter.num_inference_steps
    reads = {}
    for modulation in ("per_step", "batched"):
        acc = lbridge.accelerate(pipe, "none", 1.0, adapter=adapter, modulation=modulation, prompt="a cat",
                                 **adapter.pipeline_kwargs())  # fmt: skip
        with WeightReads(weights) as counter:
            pipe("a cat", generator=torch.Generator().manual_seed(0), **adapter.pipeline_kwargs())
            pipe("a dog", generator=torch.Generator().manual_seed(1), **adapter.pipeline_kwargs())
        acc.remove()
        reads[modulation] = counter.reads
    assert reads == {"per_step": 2 * steps * len(weights), "batched": 2 * len(weights)}


def test_each_sample_gets_its_own_tables_and_removal_restores_the_model(random_flux):
    adapter, pipe = random_flux
    first = sample(pipe, adapter, "toca", "batched", seed=0)
    other = sample(pipe, adapter, "toca", "batched", seed=1)  # same timesteps, new sample: new noise
    again = sample(pipe, adapter, "toca", "batched", seed=0)
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other)
    restored = [type(m) is torch.nn.Linear and not hasattr(m, "batched_row") for m in modulations(pipe)]
    assert restored and all(restored)
    registry = getattr(pipe.transformer.time_text_embed, "_diffusers_hook", None)
    assert registry is None or not [n for n in registry.hooks if n.startswith("lbridge.")]


def test_timesteps_the_adapter_maps_wrongly_stop_the_sample_with_an_error(random_flux, monkeypatch):
    adapter, pipe = random_flux
    monkeypatch.setattr(FluxAdapter, "embedding_timesteps", lambda self, t, dtype: t.to(dtype) + 1)
    with pytest.raises(LbridgeError, match="modulation=batched: branch 'cond' called the time embedding"):
        sample(pipe, adapter, "fora", "batched")


def test_each_cfg_branch_batches_its_own_modulations(tiny):
    adapter, pipe = tiny  # the embedded model: FLUX blocks, two CFG branches ('cond', 'uncond')
    per_step, batched = (sample(pipe, adapter, "toca", m) for m in ("per_step", "batched"))
    np.testing.assert_allclose(batched, per_step, atol=1e-5)


def test_a_model_without_a_step_embedding_is_refused_naming_the_accepted_value():
    adapter = load_adapter("dit_xl_2", random_weights=True, dtype="float32", device="cpu")
    pipe = adapter.load_pipeline()
    call = {**adapter.prompt_kwargs(pipe, "1"), **adapter.pipeline_kwargs(), "num_inference_steps": 4}
    refused = "modulation=batched is not available for model 'dit_xl_2'.*per_step"
    with pytest.raises(LbridgeError, match=refused):
        lbridge.accelerate(pipe, "fora", 2.0, adapter=adapter, modulation="batched", **call)


def test_an_unknown_modulation_is_refused_naming_the_accepted_ones(random_flux):
    adapter, pipe = random_flux
    with pytest.raises(LbridgeError, match="unknown modulation 'cached' \\(accepted: per_step, batched\\)"):
        lbridge.accelerate(pipe, "fora", 2.0, adapter=adapter, modulation="cached")


def test_a_modulation_that_is_not_a_plain_linear_is_refused_naming_its_type(random_flux):
    adapter, pipe = random_flux

    class QuantizedLinear(torch.nn.Linear):  # stands for a quantized or adapted layer
        pass

    linear = modulations(pipe)[0]
    original = linear.__class__
    linear.__class__ = QuantizedLinear
    try:
        refused = "an AdaLN modulation is a QuantizedLinear, not a torch.nn.Linear"
        with pytest.raises(LbridgeError, match=refused):
            lbridge.accelerate(pipe, "fora", 2.0, adapter=adapter, modulation="batched", prompt="a cat",
                               **adapter.pipeline_kwargs())  # fmt: skip
    finally:
        linear.__class__ = original
    assert all(type(m) is torch.nn.Linear for m in modulations(pipe))
    hooked = [m for m in pipe.transformer.modules() if getattr(m, "_diffusers_hook", None) is not None
              and any(n.startswith("lbridge.") for n in m._diffusers_hook.hooks)]  # fmt: skip
    assert not hooked  # nothing of the refused accelerator left on the model
