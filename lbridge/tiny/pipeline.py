"""`TinyDigitsPipeline`: a pixel-space, class-prompted flow-matching pipeline for 16x16 digits.

It mirrors FluxPipeline's denoising loop (2x2 patch packing, rotary image ids, `timestep / 1000`,
`cache_context("cond"/"uncond")` around every transformer call, FlowMatchEuler steps) so that every
lbridge hook sees exactly what it sees inside FLUX.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from lbridge.tiny.text_encoder import DigitPromptEncoder

IMAGE_SIZE = 16
CHANNELS = 1


def pack(images: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) pixels -> (B, H/2 * W/2, 4) tokens, FLUX's 2x2 patch packing."""
    b, c, h, w = images.shape
    return FluxPipeline._pack_latents(images, b, c, h, w)


def unpack(tokens: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    return FluxPipeline._unpack_latents(tokens, size, size, vae_scale_factor=1)


def image_ids(
    size: int = IMAGE_SIZE, device: torch.device | None = None, dtype=torch.float32
) -> torch.Tensor:
    return FluxPipeline._prepare_latent_image_ids(1, size // 2, size // 2, device, dtype)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[-1, 1] grayscale tensors -> 8-bit PIL images (deterministic rounding)."""
    array = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a[0]), mode="L") for a in array]


class TinyDigitsPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "text_encoder->transformer"

    def __init__(
        self,
        transformer: FluxTransformer2DModel,
        scheduler: FlowMatchEulerDiscreteScheduler,
        text_encoder: DigitPromptEncoder,
    ):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, text_encoder=text_encoder)

    def encode_prompt(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        embeds, pooled = self.text_encoder(prompts)
        text_ids = torch.zeros(embeds.shape[1], 3, device=embeds.device, dtype=embeds.dtype)
        return embeds, pooled, text_ids

    def predict(self, latents, t, embeds, pooled, text_ids, img_ids, branch: str) -> torch.Tensor:
        timestep = t.expand(latents.shape[0]).to(latents.dtype)
        with self.transformer.cache_context(branch):
            return self.transformer(
                hidden_states=latents,
                timestep=timestep / 1000,
                pooled_projections=pooled,
                encoder_hidden_states=embeds,
                txt_ids=text_ids,
                img_ids=img_ids,
                return_dict=False,
            )[0]

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        num_inference_steps: int = 20,
        guidance_scale: float = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        device, dtype = self.transformer.device, self.transformer.dtype
        embeds, pooled, text_ids = self.encode_prompt(prompts)
        do_cfg = guidance_scale > 1.0
        if do_cfg:
            neg_embeds, neg_pooled, _ = self.encode_prompt([""] * len(prompts))
        shape = (len(prompts), CHANNELS, IMAGE_SIZE, IMAGE_SIZE)
        latents = pack(randn_tensor(shape, generator=generator, device=device, dtype=dtype))
        img_ids = image_ids(IMAGE_SIZE, device, dtype)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        self.scheduler.set_begin_index(0)
        for t in self.progress_bar(self.scheduler.timesteps):
            velocity = self.predict(latents, t, embeds, pooled, text_ids, img_ids, "cond")
            if do_cfg:
                uncond = self.predict(latents, t, neg_embeds, neg_pooled, text_ids, img_ids, "uncond")
                velocity = uncond + guidance_scale * (velocity - uncond)
            latents = self.scheduler.step(velocity, t, latents, return_dict=False)[0]

        images = unpack(latents)
        if output_type == "pil":
            images = to_pil(images)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)
