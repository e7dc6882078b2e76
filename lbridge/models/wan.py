"""Wan2.1 text-to-video (WanTransformer3DModel): one stack of blocks (self-attention, cross-attention, FFN).

The 1.3B and 14B models share this adapter (conf/model/wan21_1_3b.yaml, wan21_14b.yaml). CFG is two
transformer calls per step, named `cond` and `uncond` by the pipeline.

No `head()`: the output AdaLN reads the timestep embedding `temb`, but the blocks receive only its
projection `timestep_proj` (a Linear of SiLU(temb), not invertible), so the head cannot be evaluated
from the final block's arguments. LearniBridge on Wan needs method.loss=block or normed.

ToCa: a block's token chain is `norm3 -> modulation -> ffn`, both attentions reused, and the block
runs as one forward (`block_full`, `block_reused`). Those read a per-token modulation (Wan2.2 TI2V's
per-token timesteps) at the refreshed tokens; the block's own forward under the chain's hooks
(`method.fused_blocks=false`) cannot, so that combination is for Wan2.1's per-step modulation only
(a per-token call there is refused with a message, `modulation_per_token`).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanTransformerBlock

from lbridge.models.base import ChainStep, FullStep, ReusedAttentionStep, TokenChain
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

    def block_only_modules(self, transformer: WanTransformer3DModel) -> list[torch.nn.Module]:
        """The text (and, image-to-video, image) projections inside the condition embedder; its
        timestep embedding, which the head reads, still runs."""
        embedder = transformer.condition_embedder
        projections = (embedder.text_embedder, getattr(embedder, "image_embedder", None))
        return [m for m in projections if m is not None]

    def modulated_input(self, block: torch.nn.Module, arguments: dict[str, Any]) -> torch.Tensor:
        """TeaCache4Wan2.1's indicator: the step's timestep projection `e0` (the blocks' `temb`, the six
        AdaLN modulation vectors), not the hidden input, since the reference measures that and fits its
        published coefficients on it. Flattened per sample (the early verdict measures it as
        `time_proj` returns it, before the transformer unflattens it) and float32, as the reference
        computes it."""
        if not isinstance(block, WanTransformerBlock):
            return super().modulated_input(block, arguments)
        return arguments["temb"].flatten(1).float()

    def modulation_per_token(self, block: torch.nn.Module, arguments: dict[str, Any]) -> bool:
        """Wan2.2 TI2V: `temb` is (batch, tokens, 6, dim), a timestep per latent token."""
        return isinstance(block, WanTransformerBlock) and arguments["temb"].ndim == 4

    def probe_sources(self, transformer: WanTransformer3DModel) -> dict[str, torch.nn.Module]:
        """`time_proj` runs inside the condition embedder before its text projection, so TeaCache's
        CACHED calls skip that projection; the blocks get its output unflattened (a view of it)."""
        return {"temb": transformer.condition_embedder.time_proj}

    def attn_mlp_sites(self, block: torch.nn.Module) -> list[torch.nn.Module]:
        return [block.attn1, block.attn2, block.ffn]

    def token_chains(self, block: torch.nn.Module) -> list[TokenChain]:
        """After the cross-attention's residual: `norm3 -> modulation -> ffn`."""
        return [TokenChain(block.norm3, block.ffn)] if isinstance(block, WanTransformerBlock) else []

    def attention_inputs(self, block: torch.nn.Module) -> list[torch.nn.Module]:
        """`norm1` feeds the self-attention alone, `norm2` the cross-attention alone."""
        return [block.norm1, block.norm2] if isinstance(block, WanTransformerBlock) else []

    def reused_attention_forward(self, block: torch.nn.Module):
        return block_reused if isinstance(block, WanTransformerBlock) else None

    def full_step_forward(self, block: torch.nn.Module):
        return block_full if isinstance(block, WanTransformerBlock) else None


# The block forwards below are diffusers' WanTransformerBlock forward, operation for operation in the
# same order (bit-identical to the block running under ToCa's module hooks, tested), without
# dispatching the hooks of the modules it calls; compiled, each is one graph (flux.py has the same).


def block_full(
    block: WanTransformerBlock, step: FullStep, hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor, temb: torch.Tensor, rotary_emb: Any,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:  # fmt: skip
    """The block at a FULL step, with its self- and cross-attention's outputs and its `ffn` output."""
    (norm1, norm2), (attn1, attn2) = step.attention_inputs, step.attentions
    shift_msa, scale_msa, gate_msa, *ffn_modulation = _modulation(block, temb)
    norm_hidden_states = (norm1(hidden_states.float()) * (1 + scale_msa) + shift_msa).type_as(hidden_states)
    self_attention = attn1(norm_hidden_states, None, None, rotary_emb)
    hidden_states = (hidden_states.float() + self_attention * gate_msa).type_as(hidden_states)
    # Every temporary is freed where diffusers' forward frees it: held through the FFN beside the kept
    # attention outputs, it would add to the block's peak (a ToCa run's is at most full compute's plus
    # its cache, tested).
    norm_hidden_states = norm2(hidden_states.float()).type_as(hidden_states)
    cross_attention = attn2(norm_hidden_states, encoder_hidden_states, None, None)
    del norm_hidden_states
    hidden_states = hidden_states + cross_attention
    hidden_states, ff_output = _feed_forward(hidden_states, ffn_modulation, step.chains)
    return hidden_states, [self_attention, cross_attention], [ff_output]


def block_reused(
    block: WanTransformerBlock, step: ReusedAttentionStep, hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor, temb: torch.Tensor, *_: Any, **__: Any,
) -> torch.Tensor:  # fmt: skip
    """The block with both attentions reused: their gated residuals over every token, the chain
    (`norm3 -> modulation -> ffn`) on the refreshed tokens."""
    _, _, gate_msa, *ffn_modulation = _modulation(block, temb)
    self_attention, cross_attention = step.attentions
    hidden_states = (hidden_states.float() + self_attention * gate_msa).type_as(hidden_states)
    hidden_states = hidden_states + cross_attention
    hidden_states, _ = _feed_forward(hidden_states, ffn_modulation, step.chains)
    return hidden_states


def _modulation(block: WanTransformerBlock, temb: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Shift, scale and gate of the self-attention, then of the FFN, float32: (batch, 1, dim), or per
    token (batch, tokens, dim) where `temb` is (batch, tokens, 6, dim) (Wan2.2 TI2V)."""
    if temb.ndim == 4:
        chunks = (block.scale_shift_table.unsqueeze(0) + temb.float()).chunk(6, dim=2)
        return tuple(chunk.squeeze(2) for chunk in chunks)
    return (block.scale_shift_table + temb.float()).chunk(6, dim=1)


def _feed_forward(
    hidden_states: torch.Tensor, modulation: list[torch.Tensor], chains: list[ChainStep]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The block from the cross-attention's residual on: its output, and `ffn`'s (every token's)."""
    (chain,) = chains
    c_shift_msa, c_scale_msa, c_gate_msa = modulation
    if c_shift_msa.shape[1] != 1:  # per token: the refreshed tokens' own
        c_shift_msa, c_scale_msa = chain.gather(c_shift_msa), chain.gather(c_scale_msa)
    normed = chain.entry(chain.gather(hidden_states).float())  # gathered first: a float copy of those alone
    modulated = (normed * (1 + c_scale_msa) + c_shift_msa).type_as(hidden_states)
    del normed  # not held through the FFN (diffusers' forward frees it there)
    ff_output = chain.exit(modulated)
    return (hidden_states.float() + ff_output.float() * c_gate_msa).type_as(hidden_states), ff_output


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
