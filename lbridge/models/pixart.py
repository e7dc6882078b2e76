"""PixArt-α (PixArtTransformer2DModel): 28 BasicTransformerBlocks (self-attention, cross-attention, FFN).

The pipeline batches CFG into one transformer call per step and never names a branch (PixArt has no
CacheMixin), so every call is lbridge's `default` branch: with one call per step, per-branch state
is still per step and exact.

No `head()`: the output AdaLN reads `embedded_timestep`, but the blocks receive only the 6-way
modulation projected from it (a Linear of SiLU, not invertible). LearniBridge on PixArt needs
method.loss=block or normed.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DPMSolverMultistepScheduler,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
)

from lbridge.models.base import ModelAdapter
from lbridge.models.offline import evaluated, placed, vocabulary_size, word_tokenizer


class PixArtAdapter(ModelAdapter):
    transformer_class = PixArtTransformer2DModel

    def __init__(self, random_weights: bool = False, max_sequence_length: int = 120, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.random_weights = random_weights
        self.max_sequence_length = max_sequence_length

    def load_pipeline(self) -> PixArtAlphaPipeline:
        if self.random_weights:
            return placed(tiny_random_pixart_pipeline(), self.device, self.dtype)
        return self.from_pretrained(PixArtAlphaPipeline)

    def pipeline_kwargs(self) -> dict[str, Any]:
        kwargs = {"guidance_scale": self.guidance_scale, "max_sequence_length": self.max_sequence_length}
        if self.random_weights:
            # Aspect-ratio bins exist only for the real sample sizes (256/512/1024 px); the word-level
            # tokenizer needs no caption cleaning (which wants BeautifulSoup and warns without it).
            kwargs.update(use_resolution_binning=False, clean_caption=False)
        return {**kwargs, **super().pipeline_kwargs()}

    def blocks(self, transformer: PixArtTransformer2DModel) -> list[torch.nn.Module]:
        return list(transformer.transformer_blocks)

    def block_only_modules(self, transformer: PixArtTransformer2DModel) -> list[torch.nn.Module]:
        """The T5 caption projection (the head reads the image stream and the step embedding)."""
        return [transformer.caption_projection] if transformer.caption_projection is not None else []

    def probe_sources(self, transformer: PixArtTransformer2DModel) -> dict[str, torch.nn.Module]:
        """The patch embedding runs before the caption projection (TeaCache's raw-input probe)."""
        return {"hidden_states": transformer.pos_embed}

    def attn_mlp_sites(self, block: torch.nn.Module) -> list[torch.nn.Module]:
        return [block.attn1, block.attn2, block.ff]


def tiny_random_pixart_pipeline(seed: int = 0) -> PixArtAlphaPipeline:
    """A PixArtAlphaPipeline of tiny random components (T5 text encoder, 2x VAE), built offline."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=16, sample_size=16, patch_size=2, caption_channels=16,
    )  # fmt: skip
    t5 = T5EncoderModel(T5Config(
        vocab_size=vocabulary_size(), d_model=16, d_ff=32, d_kv=8, num_heads=2, num_layers=1,
        decoder_start_token_id=0, pad_token_id=0,
    ))  # fmt: skip
    vae = tiny_vae(latent_channels=4)
    evaluated(transformer, t5, vae)
    return PixArtAlphaPipeline(
        tokenizer=word_tokenizer(120), text_encoder=t5, vae=vae, transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(),
    )  # fmt: skip


def tiny_vae(latent_channels: int) -> AutoencoderKL:
    """A two-level AutoencoderKL (2x spatial compression) of a few hundred parameters."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(4, 4), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=2, sample_size=32,
    )  # fmt: skip
