"""DiT (DiTTransformer2DModel), class-conditional on ImageNet: 28 BasicTransformerBlocks (adaLN-Zero).

The "prompt" is an ImageNet class: an integer 0..999 or a class name the pipeline knows
(`DiTPipeline.get_label_ids`). CFG is batched into one transformer call per step, lbridge's `default`
branch (DiT has no CacheMixin). DDPM/DDIM schedulers keep no step index: lbridge's clock finds the
call's timestep in the schedule (lbridge/runtime/context.py).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel
from PIL import Image

from lbridge.errors import LbridgeError
from lbridge.models.base import ModelAdapter
from lbridge.models.offline import evaluated, placed
from lbridge.models.pixart import tiny_vae

#: Class names of the tiny random pipeline (the first ImageNet classes), so names work offline too.
TINY_LABELS = {0: "tench", 1: "goldfish", 2: "great white shark", 3: "tiger shark", 4: "hammerhead"}


class DiTAdapter(ModelAdapter):
    transformer_class = DiTTransformer2DModel

    def __init__(self, random_weights: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.random_weights = random_weights

    def load_pipeline(self) -> DiTPipeline:
        if self.random_weights:
            return placed(tiny_random_dit_pipeline(), self.device, self.dtype)
        return self.from_pretrained(DiTPipeline)

    def pipeline_kwargs(self) -> dict[str, Any]:
        # The resolution is the model's own (sample_size latents): there is no height/width argument.
        kwargs = {"num_inference_steps": self.num_inference_steps, "guidance_scale": self.guidance_scale}
        return {**kwargs, **self.call_kwargs}

    def prompt_kwargs(self, pipe: DiTPipeline, prompt: str) -> dict[str, Any]:
        return {"class_labels": [class_label(pipe, prompt)]}

    def generate(self, pipe: DiTPipeline, prompt: str, seed: int) -> Image.Image:
        # DDPM draws each step's noise from the global RNG, not from `generator`: seed it too, so a
        # sample and its full-compute reference share every noise draw.
        torch.manual_seed(seed)
        return super().generate(pipe, prompt, seed)

    def blocks(self, transformer: DiTTransformer2DModel) -> list[torch.nn.Module]:
        return list(transformer.transformer_blocks)

    def attn_mlp_sites(self, block: torch.nn.Module) -> list[torch.nn.Module]:
        return [block.attn1, block.ff]

    def head(self, transformer: DiTTransformer2DModel, hidden: torch.Tensor, arguments: dict) -> torch.Tensor:
        """adaLN from the (timestep, class) embedding the blocks also compute, then the patch projection."""
        embedding = transformer.transformer_blocks[0].norm1.emb
        conditioning = embedding(arguments["timestep"], arguments["class_labels"], hidden_dtype=hidden.dtype)
        shift, scale = transformer.proj_out_1(F.silu(conditioning)).chunk(2, dim=1)
        return transformer.proj_out_2(transformer.norm_out(hidden) * (1 + scale[:, None]) + shift[:, None])


def class_label(pipe: DiTPipeline, prompt: str) -> int:
    """'207' -> 207; 'golden retriever' -> its ImageNet id (one-line error naming what is accepted)."""
    classes = pipe.transformer.config.num_embeds_ada_norm
    text = prompt.strip()
    if text.isdigit() and int(text) < classes:
        return int(text)
    labels = getattr(pipe, "labels", {})
    if text in labels:
        return int(labels[text])
    examples = ", ".join(list(labels)[:3]) or "none: this pipeline has no id2label"
    raise LbridgeError(
        f"DiT prompt '{prompt}' is not a class (accepted: an integer 0..{classes - 1} or a class name "
        f"such as {examples})"
    )


def tiny_random_dit_pipeline(seed: int = 0) -> DiTPipeline:
    """A DiTPipeline of tiny random components (1000 classes like ImageNet, 2x VAE), built offline."""
    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        norm_num_groups=2, sample_size=16, patch_size=2, num_embeds_ada_norm=1000,
    )  # fmt: skip
    vae = tiny_vae(latent_channels=4)
    evaluated(transformer, vae)
    return DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler(), id2label=TINY_LABELS)
