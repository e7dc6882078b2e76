"""Transformers of the real model configs with random weights, fixed inputs, and the denoising loop.

Timing needs the shapes and the code path of the real model, not its weights: each config builds the
family's diffusers transformer class with the published config numbers and fixed random inputs of the
real token counts. `DenoisingLoop` stands in for the pipeline: it is what `lbridge.api.Accelerator`
needs (a `transformer`, a `scheduler` whose `step_index` is lbridge's clock, a call taking
`num_inference_steps`), so the methods run exactly as under `lbridge sample`, without VAE or text encoder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
    HunyuanVideoTransformer3DModel,
    WanTransformer3DModel,
)

from lbridge.models.base import adapter_for
from lbridge.runtime.modulation import batchable

Inputs = tuple[torch.Tensor, dict[str, dict[str, Any]]]  # initial latents, call kwargs per CFG branch


@dataclass(frozen=True)
class BenchConfig:
    """A transformer config, its input shape and the sampling protocol the benchmark runs."""

    name: str
    family: str  # flux | wan | hunyuan_video: picks the transformer class and the input builder
    transformer: dict[str, Any]
    latent: tuple[int, ...]  # flux: (image tokens, channels); video: (channels, frames, height, width)
    text_tokens: int
    steps: int
    guidance: float = 3.5  # flux / hunyuan: embedded guidance; wan: CFG scale (two calls per step)
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def branches(self) -> tuple[str, ...]:
        return ("cond", "uncond") if self.family == "wan" else ("cond",)


FLUX_DEV = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)  # fmt: skip
FLUX_TINY = {**FLUX_DEV, "num_layers": 1, "num_single_layers": 2, "attention_head_dim": 16,
             "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 32,
             "in_channels": 4, "axes_dims_rope": (4, 6, 6)}  # fmt: skip
WAN21_1_3B = dict(
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6,
)  # fmt: skip
HUNYUAN_VIDEO = dict(
    in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
    num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1,
    qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768,
    rope_theta=256.0, rope_axes_dim=(16, 56, 56),
)  # fmt: skip

CONFIGS: dict[str, BenchConfig] = {
    c.name: c
    for c in (
        BenchConfig(
            "flux-dev", "flux", FLUX_DEV, latent=(4096, 64), text_tokens=512, steps=50,
            note="FLUX.1-dev: 19 double + 38 single blocks, dim 3072, 1024x1024 (4096 image tokens), T5 512",
        ),
        BenchConfig(
            "flux-medium", "flux",
            {**FLUX_DEV, "num_layers": 4, "num_single_layers": 8, "attention_head_dim": 64,
             "num_attention_heads": 4, "axes_dims_rope": (8, 28, 28)},
            latent=(576, 64), text_tokens=64, steps=20,
            note="FLUX layout at 2-core CPU size: 4 double + 8 single blocks, dim 256, 576 image + 64 text "
            "tokens",
        ),
        BenchConfig(
            "flux-tiny", "flux", FLUX_TINY, latent=(16, 4), text_tokens=8, steps=8,
            note="tests only: the code path in a second",
        ),
        BenchConfig(
            "flux-dev-depth", "flux", {**FLUX_TINY, "num_layers": 19, "num_single_layers": 38},
            latent=(16, 4), text_tokens=8, steps=20,
            note="FLUX.1-dev's 19 double + 38 single blocks at flux-tiny width: the host's cost of a call "
            "at that depth (Python, dispatch), its compute negligible",
        ),
        BenchConfig(
            "wan21-1.3b", "wan", WAN21_1_3B,
            latent=(16, 21, 60, 104), text_tokens=512, steps=50, guidance=5.0,
            note="Wan2.1-T2V-1.3B: 30 blocks, dim 1536, 480x832x81 frames (32760 tokens), CFG 2 calls/step",
        ),
        BenchConfig(
            "wan-medium", "wan",
            {**WAN21_1_3B, "num_attention_heads": 4, "attention_head_dim": 64, "ffn_dim": 1536,
             "num_layers": 8},
            latent=(16, 4, 24, 24), text_tokens=64, steps=20, guidance=5.0,
            note="Wan2.1 layout at 2-core CPU size: 8 blocks, dim 256, FFN 1536, 4x12x12 latent "
            "(576 tokens), 64 text tokens, CFG 2 calls/step",
        ),
        BenchConfig(
            "wan-tiny", "wan",
            dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
                 out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=3, rope_max_seq_len=32),
            latent=(4, 2, 8, 8), text_tokens=8, steps=6, guidance=5.0, note="tests only",
        ),
        BenchConfig(
            "hunyuan-tiny", "hunyuan_video",
            dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
                 num_single_layers=2, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=16,
                 pooled_projection_dim=8, rope_axes_dim=(2, 2, 4)),
            latent=(4, 2, 8, 8), text_tokens=8, steps=6, guidance=6.0, note="tests only",
        ),
        BenchConfig(
            "hunyuan-video", "hunyuan_video", HUNYUAN_VIDEO,
            latent=(16, 33, 90, 160), text_tokens=256, steps=50, guidance=6.0,
            note="HunyuanVideo: 20 double + 40 single blocks, dim 3072, 720x1280x129 frames (118800 tokens)",
        ),
        BenchConfig(
            "hunyuan-medium", "hunyuan_video",
            {**HUNYUAN_VIDEO, "num_attention_heads": 4, "attention_head_dim": 64, "num_layers": 4,
             "num_single_layers": 8, "rope_axes_dim": (16, 24, 24)},
            latent=(16, 4, 24, 24), text_tokens=64, steps=20, guidance=6.0,
            note="HunyuanVideo layout at 2-core CPU size: 4 double + 8 single blocks, dim 256, 4x12x12 "
            "latent (576 tokens), 64 text tokens",
        ),
    )
}  # fmt: skip


def with_heads(config: BenchConfig, heads: int) -> BenchConfig:
    """`config` with `heads` attention heads of the same head size: its width scaled, all else kept.

    A width sweep tells work that grows with the square of the width (the matmuls FLOPs count) from
    work that grows with it (norms, gates, residual adds, gathers: what FLOPs leave out). Wan's
    `ffn_dim` is a number of its own and stays.
    """
    dim = heads * config.transformer["attention_head_dim"]
    transformer = {**config.transformer, "num_attention_heads": heads}
    note = f"{config.note}; widened to {heads} heads: dim {dim}"
    return replace(config, name=f"{config.name}-dim{dim}", transformer=transformer, note=note)


TRANSFORMERS: dict[str, type[torch.nn.Module]] = {
    "flux": FluxTransformer2DModel,
    "wan": WanTransformer3DModel,
    "hunyuan_video": HunyuanVideoTransformer3DModel,
}


def build_transformer(config: BenchConfig, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The family's transformer with random weights, built directly on `device` in `dtype`.

    Built under the target default dtype and device so a 12B model never exists in float32 on the host.
    """
    previous = torch.get_default_dtype()
    torch.manual_seed(0)
    try:
        torch.set_default_dtype(dtype)
        with torch.device(device):
            model = TRANSFORMERS[config.family](**config.transformer)
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


def batches_modulation(config: BenchConfig) -> bool:
    """Whether `modulation=batched` applies to the config's family (`batchable`: FLUX, HunyuanVideo)."""
    transformer = build_transformer(config, torch.device("meta"), torch.bfloat16)  # no weights made
    return batchable(adapter_for(transformer))


def _flux_inputs(config: BenchConfig, g: torch.Generator) -> Inputs:
    tokens, channels = config.latent
    side = int(round(tokens**0.5))
    ids = torch.zeros(side, side, 3)
    ids[..., 1] = torch.arange(side)[:, None]
    ids[..., 2] = torch.arange(side)[None, :]
    t = config.transformer
    kwargs = {
        "encoder_hidden_states": torch.randn(1, config.text_tokens, t["joint_attention_dim"], generator=g),
        "pooled_projections": torch.randn(1, t["pooled_projection_dim"], generator=g),
        "img_ids": ids.reshape(-1, 3),
        "txt_ids": torch.zeros(config.text_tokens, 3),
        "guidance": torch.full((1,), config.guidance),
    }
    return torch.randn(1, tokens, channels, generator=g), {"cond": kwargs}


def _wan_inputs(config: BenchConfig, g: torch.Generator) -> Inputs:
    dim = config.transformer["text_dim"]
    branches = {
        name: {"encoder_hidden_states": torch.randn(1, config.text_tokens, dim, generator=g)}
        for name in config.branches
    }
    return torch.randn(1, *config.latent, generator=g), branches


def _hunyuan_inputs(config: BenchConfig, g: torch.Generator) -> Inputs:
    t = config.transformer
    kwargs = {
        "encoder_hidden_states": torch.randn(1, config.text_tokens, t["text_embed_dim"], generator=g),
        "encoder_attention_mask": torch.ones(1, config.text_tokens, dtype=torch.long),
        "pooled_projections": torch.randn(1, t["pooled_projection_dim"], generator=g),
        "guidance": torch.full((1,), config.guidance * 1000.0),
    }
    return torch.randn(1, *config.latent, generator=g), {"cond": kwargs}


INPUT_BUILDERS: dict[str, Callable[[BenchConfig, torch.Generator], Inputs]] = {
    "flux": _flux_inputs,
    "wan": _wan_inputs,
    "hunyuan_video": _hunyuan_inputs,
}
#: What the family's pipeline divides the scheduler timestep by (in the latents' dtype) before the
#: transformer call: FluxPipeline's `t.to(dtype) / 1000`, exactly, as `modulation=batched` checks.
TIMESTEP_DIVISOR = {"flux": 1000, "wan": 1, "hunyuan_video": 1}


def _placed(value: Any, device: torch.device, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(device, dtype)
    return value.to(device) if isinstance(value, torch.Tensor) else value


class DenoisingLoop:
    """A flow-matching Euler loop over fixed random inputs: the pipeline `Accelerator` drives.

    Each step calls the transformer once per CFG branch inside `transformer.cache_context(branch)`,
    as diffusers pipelines do, and advances the scheduler, whose `step_index` is lbridge's clock.
    """

    def __init__(self, transformer: torch.nn.Module, config: BenchConfig, device: torch.device,
                 dtype: torch.dtype) -> None:  # fmt: skip
        self.transformer, self.config = transformer, config
        self.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
        latents, branches = INPUT_BUILDERS[config.family](config, torch.Generator().manual_seed(0))
        self.latents = latents.to(device, dtype)
        self.branches = {
            name: {k: _placed(v, device, dtype) for k, v in kwargs.items()}
            for name, kwargs in branches.items()
        }
        self.timestep_divisor = TIMESTEP_DIVISOR[config.family]

    @torch.no_grad()
    def __call__(self, num_inference_steps: int, **_: Any) -> torch.Tensor:
        scheduler = self.scheduler
        scheduler.set_timesteps(num_inference_steps, device=self.latents.device)
        # As diffusers' pipelines do: without it the first `step()` finds its index by a `nonzero()`
        # over the timesteps on the device, a host sync the `host_syncs` column would count.
        scheduler.set_begin_index(0)
        latents = self.latents.clone()
        for t in scheduler.timesteps:
            timestep = t.expand(latents.shape[0]).to(latents.dtype)
            if self.timestep_divisor != 1:
                timestep = timestep / self.timestep_divisor
            outputs = {}
            for name, kwargs in self.branches.items():
                with self.transformer.cache_context(name):
                    outputs[name] = self.transformer(
                        hidden_states=latents, timestep=timestep, return_dict=False, **kwargs
                    )[0]
            velocity = outputs["cond"]
            if "uncond" in outputs:
                velocity = outputs["uncond"] + self.config.guidance * (velocity - outputs["uncond"])
            latents = scheduler.step(velocity, t, latents, return_dict=False)[0]
        return latents
