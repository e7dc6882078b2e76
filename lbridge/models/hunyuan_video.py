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

from lbridge.models.base import (
    ChainStep,
    FullStep,
    ReusedAttentionStep,
    TokenChain,
    dual_stream_after_attention,
    dual_stream_attention,
    dual_stream_chains,
    dual_stream_forward,
    dual_stream_gates,
    single_stream_chain,
)
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

    def block_only_modules(self, transformer: HunyuanVideoTransformer3DModel) -> list[torch.nn.Module]:
        """The token refiner (two timestep-conditioned transformer layers over the text tokens): the
        head reads the video stream and `temb`; outside the blocks only its output's length is read
        (the attention mask), which its last output has too."""
        return [transformer.context_embedder]

    def modulated_input(self, block: torch.nn.Module, arguments: dict[str, Any]) -> torch.Tensor:
        """The video stream's norm1(x) * (1 + scale) + shift with the step's `temb`, as the reference
        TeaCache4HunyuanVideo reads it on the first double block (other blocks: the raw input)."""
        if not isinstance(block, HunyuanVideoTransformerBlock):
            return super().modulated_input(block, arguments)
        return block.norm1(arguments["hidden_states"], emb=arguments["temb"])[0]

    def probe_sources(self, transformer: HunyuanVideoTransformer3DModel) -> dict[str, torch.nn.Module]:
        """The patch embedding and the step embedding run before the token refiner, so TeaCache's
        CACHED calls skip it (it was most of them on the CPU's hunyuan-medium: docs/speed.md)."""
        return {"hidden_states": transformer.x_embedder, "temb": transformer.time_text_embed}

    def step_embedding(self, transformer: HunyuanVideoTransformer3DModel) -> torch.nn.Module:
        """`(temb, token_replace_emb)` from the timestep, pooled text and guidance; the token
        refiner embeds the timestep on its own (its modulations are not AdaLN-Zero: per step)."""
        return transformer.time_text_embed

    def embedding_timesteps(self, timesteps: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """HunyuanVideoPipeline passes `t.expand(batch).to(latents.dtype)`, unscaled."""
        return timesteps.to(dtype)

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

    def reused_attention_forward(self, block: torch.nn.Module):
        return dual_stream_forward(
            block,
            {
                HunyuanVideoTransformerBlock: double_block_reused,
                HunyuanVideoSingleTransformerBlock: single_block_reused,
            },
        )

    def full_step_forward(self, block: torch.nn.Module):
        return dual_stream_forward(
            block,
            {
                HunyuanVideoTransformerBlock: double_block_full,
                HunyuanVideoSingleTransformerBlock: single_block_full,
            },
        )


# The block forwards below are diffusers' HunyuanVideoTransformerBlock / HunyuanVideoSingleTransformerBlock
# forwards, operation for operation (bit-identical to the blocks running under ToCa's module hooks,
# tested), without dispatching the hooks of the modules they call; compiled, each is one graph. The
# transformer calls its blocks with two more arguments (token replacement, for its I2V blocks) that
# these blocks ignore, as diffusers' do.


def double_block_full(
    block: HunyuanVideoTransformerBlock, step: FullStep, hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor, temb: torch.Tensor, attention_mask: torch.Tensor | None = None,
    freqs_cis: tuple[torch.Tensor, torch.Tensor] | None = None, *_: Any, **__: Any,
) -> tuple[tuple[torch.Tensor, torch.Tensor], list[tuple], list[torch.Tensor]]:  # fmt: skip
    """The double block at a FULL step, with its attention's output and its chains' `ff` outputs."""
    attention, gates = dual_stream_attention(
        step,
        hidden_states,
        encoder_hidden_states,
        temb,
        attention_mask=attention_mask,
        image_rotary_emb=freqs_cis,
    )
    hidden_states, encoder_hidden_states, exits = dual_stream_after_attention(
        hidden_states, encoder_hidden_states, attention, gates, step.chains
    )
    return (hidden_states, encoder_hidden_states), [attention], exits


def double_block_reused(
    block: HunyuanVideoTransformerBlock, step: ReusedAttentionStep, hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor, temb: torch.Tensor, *_: Any, **__: Any,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The double block with its attention reused: `norm1`'s gates alone, each stream's chain on its
    refreshed tokens."""
    (attention,), gates = step.attentions, dual_stream_gates(block, temb)
    hidden_states, encoder_hidden_states, _ = dual_stream_after_attention(
        hidden_states, encoder_hidden_states, attention, gates, step.chains
    )
    return hidden_states, encoder_hidden_states


def single_block_full(
    block: HunyuanVideoSingleTransformerBlock, step: FullStep, hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor, temb: torch.Tensor, attention_mask: torch.Tensor | None = None,
    image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None, *_: Any, **__: Any,
) -> tuple[tuple[torch.Tensor, torch.Tensor], list[tuple], list[torch.Tensor]]:  # fmt: skip
    """The single block at a FULL step, with its attention's output and its `proj_out` output."""
    (chain,), (attend,) = step.chains, step.attentions
    text_seq_length = encoder_hidden_states.shape[1]
    residual = torch.cat([hidden_states, encoder_hidden_states], dim=1)
    norm_hidden_states, gate = chain.entry(chain.gather(residual), emb=temb)
    mlp_hidden_states = block.act_mlp(block.proj_mlp(norm_hidden_states))
    attention = attend(
        hidden_states=norm_hidden_states[:, :-text_seq_length, :],
        encoder_hidden_states=norm_hidden_states[:, -text_seq_length:, :],
        attention_mask=attention_mask,
        image_rotary_emb=image_rotary_emb,
    )
    joined = _tokens_of_pair(attention)
    outputs, proj_output = _single_output(residual, gate, joined, mlp_hidden_states, chain, text_seq_length)
    return outputs, [attention], [proj_output]


def single_block_reused(
    block: HunyuanVideoSingleTransformerBlock, step: ReusedAttentionStep, hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor, temb: torch.Tensor, *_: Any, **__: Any,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The single block on its refreshed tokens: `norm -> proj_mlp -> act_mlp -> cat with the reused
    attention -> proj_out`; every token's gated residual from the kept `proj_out` output."""
    (chain,) = step.chains
    text_seq_length = encoder_hidden_states.shape[1]
    residual = torch.cat([hidden_states, encoder_hidden_states], dim=1)
    norm_hidden_states, gate = chain.entry(chain.gather(residual), emb=temb)
    mlp_hidden_states = block.act_mlp(block.proj_mlp(norm_hidden_states))
    outputs, _ = _single_output(residual, gate, chain.attention(), mlp_hidden_states, chain, text_seq_length)
    return outputs


def _single_output(
    residual: torch.Tensor, gate: torch.Tensor, attention: torch.Tensor, mlp_hidden_states: torch.Tensor,
    chain: ChainStep, text_seq_length: int,
) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:  # fmt: skip
    """The single block from its (joined) attention's and MLP's outputs on: its image and text
    outputs, and `proj_out`'s (every token's)."""
    proj_output = chain.exit(torch.cat([attention, mlp_hidden_states], dim=2))
    hidden_states = gate.unsqueeze(1) * proj_output + residual
    return (hidden_states[:, :-text_seq_length, :], hidden_states[:, -text_seq_length:, :]), proj_output


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
