"""Wan2.1 text-to-video (WanTransformer3DModel): one stack of blocks (self-attention, cross-attention, FFN).

The 1.3B and 14B models share this adapter (conf/model/wan21_1_3b.yaml, wan21_14b.yaml). CFG is two
transformer calls per step, named `cond` and `uncond` by the pipeline.

No `head()`: the output AdaLN reads the timestep embedding `temb`, but the blocks receive only its
projection `timestep_proj` (a Linear of SiLU(temb), not invertible), so the head cannot be evaluated
from the final block's arguments. LearniBridge on Wan needs method.loss=block or normed.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

from lbridge.models.offline import evaluated, placed, vocabulary_size, word_tokenizer
from lbridge.models.video import VideoAdapter


class WanAdapter(VideoAdapter):
    transformer_class = WanTransformer3DModel

    def __init__(self, random_weights: bool = False, max_sequence_length: int = 512, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.random_weights = random_weights
        self.max_sequence_length = max_sequence_length

    def load_pipeline(self) -> WanPipeline:
        if self.random_weights:
            return placed(tiny_random_wan_pipeline(), self.device, self.dtype)
        return self.from_pretrained(WanPipeline)

    def pipeline_kwargs(self) -> dict[str, Any]:
        return {
            "guidance_scale": self.guidance_scale,
            "max_sequence_length": self.max_sequence_length,
            **super().pipeline_kwargs(),
        }

    def blocks(self, transformer: WanTransformer3DModel) -> list[torch.nn.Module]:
        return list(transformer.blocks)

    def attn_mlp_sites(self, block: torch.nn.Module) -> list[torch.nn.Module]:
        return [block.attn1, block.attn2, block.ffn]


def tiny_random_wan_pipeline(seed: int = 0) -> WanPipeline:
    """A WanPipeline of tiny random components (UMT5 text encoder, Wan VAE), built offline."""
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32,
    )  # fmt: skip
    umt5 = UMT5EncoderModel(UMT5Config(
        vocab_size=vocabulary_size(), d_model=16, d_ff=32, d_kv=8, num_heads=2, num_layers=1,
        relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0,
    ))  # fmt: skip
    vae = AutoencoderKLWan(
        base_dim=4, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
        latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
    )  # fmt: skip
    evaluated(transformer, umt5, vae)
    # The hub pipeline's scheduler: UniPC on flow-matching sigmas, shift 3.
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
    )
    return WanPipeline(
        tokenizer=word_tokenizer(512), text_encoder=umt5, vae=vae, scheduler=scheduler,
        transformer=transformer,
    )  # fmt: skip
