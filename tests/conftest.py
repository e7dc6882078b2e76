"""Shared fixtures. Everything runs offline on CPU: the hub is never contacted."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from lbridge.models import load_adapter  # noqa: E402

torch.set_num_threads(1)  # tests run two at a time on two cores


@pytest.fixture(scope="session")
def tiny():
    """The embedded tiny model's adapter and pipeline (a few 20-step, CFG 2 generations per second)."""
    adapter = load_adapter("tiny", device="cpu")
    return adapter, adapter.load_pipeline()


@pytest.fixture(scope="session")
def random_flux():
    """A FluxPipeline of tiny random components (same classes as FLUX.1), 32x32, 8 steps."""
    adapter = load_adapter(
        "flux", random_weights=True, dtype="float32", device="cpu", height=32, width=32,
        max_sequence_length=16, num_inference_steps=8,
    )  # fmt: skip
    pipe = adapter.load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return adapter, pipe


#: Each new model family at toy size (same diffusers classes as the real model), 4 steps.
FAMILIES = {
    "hunyuan_video": dict(height=16, width=16, num_frames=5, max_sequence_length=8),
    "wan21_1_3b": dict(height=32, width=32, num_frames=5, max_sequence_length=8),
    "qwen_image": dict(height=32, width=32, max_sequence_length=16),
    "pixart_alpha": dict(height=32, width=32, max_sequence_length=16),
    "dit_xl_2": dict(),
}


@pytest.fixture(scope="session", params=list(FAMILIES))
def random_family(request):
    """(name, adapter, pipeline) of one family's tiny random-weight pipeline, float32 on CPU."""
    name = request.param
    adapter = load_adapter(
        name, random_weights=True, dtype="float32", device="cpu", num_inference_steps=4, **FAMILIES[name]
    )
    pipe = adapter.load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return name, adapter, pipe
