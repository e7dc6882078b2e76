"""What video model families share: a frame count, a frame rate, and frames as the sample."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DiffusionPipeline
from PIL import Image

from lbridge.errors import LbridgeError
from lbridge.models.base import ModelAdapter


class VideoAdapter(ModelAdapter):
    """Base of the video adapters; `generate` returns the frames (the sampler writes them)."""

    def __init__(self, num_frames: int = 81, fps: int = 16, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not isinstance(num_frames, int) or num_frames < 1 or (num_frames - 1) % 4:
            # Both video VAEs compress time 4x around a first frame: 4k + 1 frames decode exactly.
            raise LbridgeError(f"model.num_frames={num_frames!r} must be 4k + 1 (1, 5, ..., 81, 129)")
        self.num_frames, self.fps = num_frames, fps

    def pipeline_kwargs(self) -> dict[str, Any]:
        return {"num_frames": self.num_frames, **super().pipeline_kwargs()}

    def rotary_embedding(self, transformer: torch.nn.Module) -> torch.nn.Module | None:
        return getattr(transformer, "rope", None)

    def rotary_inputs(self, call: dict[str, Any], args: tuple, kwargs: dict) -> tuple | None:
        """Wan's and HunyuanVideo's `rope(hidden_states)` reads the latent's shape and device alone."""
        hidden = args[0] if args else kwargs.get("hidden_states")
        return (tuple(hidden.shape), hidden.device) if isinstance(hidden, torch.Tensor) else None

    def generate(self, pipe: DiffusionPipeline, prompt: str, seed: int) -> list[Image.Image]:
        kwargs = {**self.prompt_kwargs(pipe, prompt), **self.pipeline_kwargs(), "output_type": "pil"}
        return list(pipe(**kwargs, generator=self.generator(seed)).frames[0])
