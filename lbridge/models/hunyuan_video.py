"""HunyuanVideo (HunyuanVideoTransformer3DModel): 20 double-stream blocks, then 40 single-stream blocks.

Guidance-distilled: the guidance scale is an embedding input, so a step is one transformer call
(branch `cond`); true CFG (`true_cfg_scale` > 1 with a negative prompt) adds an `uncond` call.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    AutoencoderKLHunyuanVideo,
    FlowMatchEulerDiscreteScheduler,
    HunyuanVideoPipeline,
    HunyuanVideoTransformer3DModel,
)
from diffusers.models.transformers.transformer_hunyuan_video import (
    HunyuanVideoSingleTransformerBlock,
    HunyuanVideoTransformerBlock,
)

from lbridge.models.base import TokenChain, dual_stream_chains, single_stream_chain
from lbridge.models.offline import evaluated, placed, vocabulary_size, word_tokenizer
from lbridge.models.video import VideoAdapter

#: Sites FORA reuses in either block type (double: attn, ff, ff_context; single: attn, proj_mlp).
SITE_NAMES = ("attn", "ff", "ff_context", "proj_mlp")


def _tokens_of_pair(output: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return torch.cat(output, dim=1)


def _pair_of_tokens(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return tokens, tokens[:, :0]


class HunyuanVideoAdapter(VideoAdapter):
    transformer_class = HunyuanVideoTransformer3DModel

    def __init__(self, random_weights: bool = False, max_sequence_length: int = 256, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.random_weights = random_weights
        self.max_sequence_length = max_sequence_length

    def load_pipeline(self) -> HunyuanVideoPipeline:
        if self.random_weights:
            return placed(tiny_random_hunyuan_video_pipeline(), self.device, self.dtype)
        return self.from_pretrained(HunyuanVideoPipeline)

    def pipeline_kwargs(self) -> dict[str, Any]:
        return {
            "guidance_scale": self.guidance_scale,
            "max_sequence_length": self.max_sequence_length,
            **super().pipeline_kwargs(),
        }

    def blocks(self, transformer: HunyuanVideoTransformer3DModel) -> list[torch.nn.Module]:
        return [*transformer.transformer_blocks, *transformer.single_transformer_blocks]

    def attn_mlp_sites(self, block: torch.nn.Module) -> list[torch.nn.Module]:
        return [getattr(block, name) for name in SITE_NAMES if hasattr(block, name)]

    def token_chains(self, block: torch.nn.Module) -> list[TokenChain]:
        if isinstance(block, HunyuanVideoSingleTransformerBlock):
            # The block concatenates the image and text attention outputs along tokens before the
            # projection (the MLP's token order); all tokens in the first part give that tensor back.
            return [single_stream_chain(block, join=_tokens_of_pair, split=_pair_of_tokens)]
        return dual_stream_chains(block) if isinstance(block, HunyuanVideoTransformerBlock) else []

    def attention_inputs(self, block: torch.nn.Module) -> list[torch.nn.Module]:
        return [block.norm1, block.norm1_context] if isinstance(block, HunyuanVideoTransformerBlock) else []

    def head(
        self, transformer: HunyuanVideoTransformer3DModel, hidden: torch.Tensor, arguments: dict
    ) -> torch.Tensor:
        """AdaLN with the step's `temb`, then the projection to patches (before unpatchifying)."""
        return transformer.proj_out(transformer.norm_out(hidden, arguments["temb"]))


def tiny_random_hunyuan_video_pipeline(seed: int = 0) -> HunyuanVideoPipeline:
    """A HunyuanVideoPipeline of tiny random components (Llama + CLIP text encoders, 3D VAE), offline."""
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    torch.manual_seed(seed)
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_single_layers=2, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=16,
        pooled_projection_dim=8, rope_axes_dim=(2, 2, 4),
    )  # fmt: skip
    # Three layers: the pipeline reads the hidden states two layers before the last.
    llama = LlamaModel(LlamaConfig(
        vocab_size=vocabulary_size(), hidden_size=16, intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0,
    ))  # fmt: skip
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocabulary_size(), hidden_size=8, intermediate_size=16, num_attention_heads=2,
        num_hidden_layers=1, max_position_embeddings=77, projection_dim=8, bos_token_id=0, eos_token_id=1,
        pad_token_id=0,
    ))  # fmt: skip
    vae = AutoencoderKLHunyuanVideo(
        latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 3,
        up_block_types=("HunyuanVideoUpBlock3D",) * 3, block_out_channels=(8, 8, 8), layers_per_block=1,
        norm_num_groups=4, spatial_compression_ratio=2, temporal_compression_ratio=4,
        mid_block_add_attention=False,
    )  # fmt: skip
    evaluated(transformer, llama, clip, vae)
    return HunyuanVideoPipeline(
        text_encoder=llama,
        tokenizer=word_tokenizer(512),
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=clip,
        tokenizer_2=word_tokenizer(77),
    )
