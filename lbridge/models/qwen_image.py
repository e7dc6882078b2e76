"""Qwen-Image (QwenImageTransformer2DModel): 60 double-stream MMDiT blocks (image and text streams).

CFG is "true CFG" (`true_cfg_scale`, with a negative prompt): two transformer calls per step, named
`cond` and `uncond` by the pipeline. lbridge's `guidance_scale` is that true-CFG scale.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)

from lbridge.models.base import ModelAdapter
from lbridge.models.offline import evaluated, placed, vocabulary_size, word_tokenizer


class QwenImageAdapter(ModelAdapter):
    transformer_class = QwenImageTransformer2DModel

    def __init__(
        self,
        random_weights: bool = False,
        max_sequence_length: int = 512,
        negative_prompt: str = " ",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.random_weights = random_weights
        self.max_sequence_length = max_sequence_length
        self.negative_prompt = negative_prompt

    def load_pipeline(self) -> QwenImagePipeline:
        if self.random_weights:
            return placed(tiny_random_qwen_image_pipeline(), self.device, self.dtype)
        return self.from_pretrained(QwenImagePipeline)

    def pipeline_kwargs(self) -> dict[str, Any]:
        return {
            # Without a negative prompt the pipeline silently skips CFG: always pass one.
            "negative_prompt": self.negative_prompt,
            "true_cfg_scale": self.guidance_scale,
            "max_sequence_length": self.max_sequence_length,
            **super().pipeline_kwargs(),
        }

    def blocks(self, transformer: QwenImageTransformer2DModel) -> list[torch.nn.Module]:
        return list(transformer.transformer_blocks)

    def block_only_modules(self, transformer: QwenImageTransformer2DModel) -> list[torch.nn.Module]:
        """The text stream's norm and projection: outside the blocks only their output's length is
        read (the text rotary length), which their last output has too."""
        return [transformer.txt_norm, transformer.txt_in]

    def probe_sources(self, transformer: QwenImageTransformer2DModel) -> dict[str, torch.nn.Module]:
        """The image projection runs before the text stream's (TeaCache's raw-input probe)."""
        return {"hidden_states": transformer.img_in}

    def attn_mlp_sites(self, block: torch.nn.Module) -> list[torch.nn.Module]:
        return [block.attn, block.img_mlp, block.txt_mlp]

    def head(
        self, transformer: QwenImageTransformer2DModel, hidden: torch.Tensor, arguments: dict
    ) -> torch.Tensor:
        """AdaLN with the step's `temb`, then the projection to packed latent patches."""
        temb = arguments["temb"]
        if transformer.zero_cond_t:  # the blocks see [temb(t), temb(0)]; the head only temb(t)
            temb = temb.chunk(2, dim=0)[0]
        return transformer.proj_out(transformer.norm_out(hidden, temb))


def tiny_random_qwen_image_pipeline(seed: int = 0) -> QwenImagePipeline:
    """A QwenImagePipeline of tiny random components (Qwen2.5-VL text encoder, Qwen-Image VAE), offline."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    vocab = vocabulary_size()
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(2, 2, 4),
    )  # fmt: skip
    text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab + 4, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048,
            bos_token_id=0, eos_token_id=1, pad_token_id=0,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]},
        ),
        vision_config=dict(depth=1, hidden_size=8, intermediate_size=16, num_heads=2, out_hidden_size=16,
                           fullatt_block_indexes=[0]),
        # The vision special tokens never occur in a text prompt; they only need ids of their own.
        image_token_id=vocab, video_token_id=vocab + 1, vision_start_token_id=vocab + 2,
        vision_end_token_id=vocab + 3,
    ))  # fmt: skip
    vae = AutoencoderKLQwenImage(
        base_dim=4, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
        latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
    )  # fmt: skip
    evaluated(transformer, text_encoder, vae)
    return QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=word_tokenizer(2048),
        transformer=transformer,
    )
