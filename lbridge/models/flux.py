"""FLUX.1 (FluxTransformer2DModel): 19 double-stream blocks, then 38 single-stream blocks."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
)
from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

from lbridge.models.base import (
    ChainStep,
    FullStep,
    ModelAdapter,
    ReusedAttentionStep,
    TokenChain,
    dual_stream_after_attention,
    dual_stream_attention,
    dual_stream_chains,
    dual_stream_forward,
    dual_stream_gates,
    single_stream_chain,
)
from lbridge.models.offline import evaluated, word_tokenizer


class FluxAdapter(ModelAdapter):
    transformer_class = FluxTransformer2DModel

    def __init__(self, random_weights: bool = False, max_sequence_length: int = 512, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.random_weights = random_weights
        self.max_sequence_length = max_sequence_length

    def load_pipeline(self) -> FluxPipeline:
        if self.random_weights:
            return tiny_random_flux_pipeline().to(self.device, self.dtype)
        return self.from_pretrained(FluxPipeline)

    def pipeline_kwargs(self) -> dict[str, Any]:
        return {
            "guidance_scale": self.guidance_scale,
            "max_sequence_length": self.max_sequence_length,
            **super().pipeline_kwargs(),
        }

    def blocks(self, transformer: FluxTransformer2DModel) -> list[torch.nn.Module]:
        return [*transformer.transformer_blocks, *transformer.single_transformer_blocks]

    def block_only_modules(self, transformer: FluxTransformer2DModel) -> list[torch.nn.Module]:
        """The T5 projection: the head reads the image stream and `temb`, never the text stream."""
        return [transformer.context_embedder]

    def head(
        self, transformer: FluxTransformer2DModel, hidden: torch.Tensor, arguments: dict
    ) -> torch.Tensor:
        """What the transformer does after its final block: AdaLN with the step's `temb`, then projection."""
        return transformer.proj_out(transformer.norm_out(hidden, arguments["temb"]))

    def modulated_input(self, block: torch.nn.Module, arguments: dict[str, Any]) -> torch.Tensor:
        """norm1(x) * (1 + scale) + shift with the step's `temb`, as TeaCache reads it on FLUX."""
        return block.norm1(arguments["hidden_states"], emb=arguments["temb"])[0]

    def probe_sources(self, transformer: FluxTransformer2DModel) -> dict[str, torch.nn.Module]:
        """The patch and step embeddings run before the T5 projection, so TeaCache's CACHED calls
        skip it. Under `modulation=batched` the step embedding is answered from its table by a hook
        outside this tap, which then never fires: the verdict waits for the first block, as before."""
        return {"hidden_states": transformer.x_embedder, "temb": transformer.time_text_embed}

    def step_embedding(self, transformer: FluxTransformer2DModel) -> torch.nn.Module:
        return transformer.time_text_embed

    def embedding_timesteps(self, timesteps: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """FluxPipeline passes `t.to(dtype) / 1000`; the transformer multiplies it back by 1000."""
        return timesteps.to(dtype) / 1000 * 1000

    def rotary_embedding(self, transformer: FluxTransformer2DModel) -> torch.nn.Module:
        return transformer.pos_embed

    def rotary_inputs(self, call: dict[str, Any], args: tuple, kwargs: dict) -> tuple | None:
        """The transformer concatenates `txt_ids` and `img_ids` into a new tensor at every call: the
        two it was given decide the embedding (positionally passed: unknown)."""
        ids = call.get("txt_ids"), call.get("img_ids")
        return None if ids[0] is None or ids[1] is None else ids

    def attn_mlp_sites(self, block: torch.nn.Module) -> list[torch.nn.Module]:
        if isinstance(block, FluxSingleTransformerBlock):
            return [block.attn, block.proj_mlp]
        return [block.attn, block.ff, block.ff_context]

    def token_chains(self, block: torch.nn.Module) -> list[TokenChain]:
        if isinstance(block, FluxSingleTransformerBlock):
            return [single_stream_chain(block)]
        return dual_stream_chains(block) if isinstance(block, FluxTransformerBlock) else []

    def attention_inputs(self, block: torch.nn.Module) -> list[torch.nn.Module]:
        return [block.norm1, block.norm1_context] if isinstance(block, FluxTransformerBlock) else []

    def reused_attention_forward(self, block: torch.nn.Module):
        return dual_stream_forward(
            block,
            {FluxTransformerBlock: double_block_reused, FluxSingleTransformerBlock: single_block_reused},
        )

    def full_step_forward(self, block: torch.nn.Module):
        return dual_stream_forward(
            block, {FluxTransformerBlock: double_block_full, FluxSingleTransformerBlock: single_block_full}
        )


# The block forwards below are diffusers' FluxTransformerBlock / FluxSingleTransformerBlock forwards,
# operation for operation in the same order (bit-identical to the blocks running under ToCa's module
# hooks, tested), without dispatching the hooks of the ~10 modules a block calls: at FLUX.1-dev's
# depth that dispatch was an eighth of a CACHED call's host time. Compiled, each is one graph.


def double_block_full(
    block: FluxTransformerBlock, step: FullStep, hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
    image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    joint_attention_kwargs: dict[str, Any] | None = None,
) -> tuple[tuple[torch.Tensor, torch.Tensor], list[tuple], list[torch.Tensor]]:  # fmt: skip
    """The double block at a FULL step, with its attention's output and its chains' `ff` outputs."""
    attention, gates = dual_stream_attention(
        step, hidden_states, encoder_hidden_states, temb, image_rotary_emb=image_rotary_emb,
        **(joint_attention_kwargs or {}),
    )  # fmt: skip
    outputs, exits = _after_attention(hidden_states, encoder_hidden_states, attention, gates, step.chains)
    return outputs, [attention], exits


def double_block_reused(
    block: FluxTransformerBlock, step: ReusedAttentionStep, hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor, temb: torch.Tensor, *_: Any, **__: Any,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The double block with its attention reused: `norm1`'s gates alone, each stream's chain
    (`norm2 -> modulation -> ff`) on its refreshed tokens."""
    (attention,), gates = step.attentions, dual_stream_gates(block, temb)
    outputs, _ = _after_attention(hidden_states, encoder_hidden_states, attention, gates, step.chains)
    return outputs


def _after_attention(
    hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, attention: tuple,
    gates: tuple[tuple, tuple], chains: list[ChainStep],
) -> tuple[tuple[torch.Tensor, torch.Tensor], list[torch.Tensor]]:  # fmt: skip
    """The double block from its attention's output on: both streams' outputs (text first, as the
    block returns them), and their `ff` outputs."""
    hidden_states, encoder_hidden_states, exits = dual_stream_after_attention(
        hidden_states, encoder_hidden_states, attention, gates, chains
    )
    if len(attention) > 2:  # an IP-Adapter's attention output, added after the MLP as diffusers does
        hidden_states = hidden_states + attention[2]
    return (_clipped(encoder_hidden_states), hidden_states), exits


def single_block_full(
    block: FluxSingleTransformerBlock, step: FullStep, hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
    image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    joint_attention_kwargs: dict[str, Any] | None = None,
) -> tuple[tuple[torch.Tensor, torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:  # fmt: skip
    """The single block at a FULL step, with its attention's output and its `proj_out` output."""
    (chain,) = step.chains
    residual = torch.cat([encoder_hidden_states, hidden_states], dim=1)
    norm_hidden_states, gate = chain.entry(chain.gather(residual), emb=temb)
    mlp_hidden_states = block.act_mlp(block.proj_mlp(norm_hidden_states))
    (attend,) = step.attentions
    attention = attend(
        hidden_states=norm_hidden_states, image_rotary_emb=image_rotary_emb, **(joint_attention_kwargs or {})
    )
    text_seq_len = encoder_hidden_states.shape[1]
    outputs, proj_output = _single_output(
        (residual,), gate, attention, mlp_hidden_states, chain, text_seq_len
    )
    return outputs, [attention], [proj_output]


def single_block_reused(
    block: FluxSingleTransformerBlock, step: ReusedAttentionStep, hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor, temb: torch.Tensor, *_: Any, **__: Any,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The single block on its refreshed tokens: `norm -> proj_mlp -> act_mlp -> cat with the
    reused attention -> proj_out`; every token's gated residual from the kept `proj_out` output."""
    (chain,) = step.chains
    # Compiled, the streams stay apart: the refreshed tokens are gathered from both and each stream
    # sums its own residual (element for element the sums over their concatenation), which is then
    # never written: one read and one write of every token less per block (~2 GB a CACHED step at
    # FLUX.1-dev). Eager, one concatenation and one sum: fewer operations to dispatch.
    streams = (encoder_hidden_states, hidden_states)
    residuals = streams if torch.compiler.is_compiling() else (torch.cat(streams, dim=1),)
    norm_hidden_states, gate = chain.entry(chain.gather(*residuals), emb=temb)
    mlp_hidden_states = block.act_mlp(block.proj_mlp(norm_hidden_states))
    text_seq_len = encoder_hidden_states.shape[1]
    outputs, _ = _single_output(residuals, gate, chain.attention(), mlp_hidden_states, chain, text_seq_len)
    return outputs


def _single_output(
    residuals: tuple[torch.Tensor, ...], gate: torch.Tensor, attention: torch.Tensor,
    mlp_hidden_states: torch.Tensor, chain: ChainStep, text_seq_len: int,
) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:  # fmt: skip
    """The single block from its attention's and MLP's outputs on: its outputs, and `proj_out`'s.
    `residuals`: the block's input, joined (one tensor) or as its text and image streams."""
    proj_output = chain.exit(torch.cat([attention, mlp_hidden_states], dim=2))
    gate = gate.unsqueeze(1)
    if len(residuals) == 1:
        hidden_states = _clipped(residuals[0] + gate * proj_output)
        return (hidden_states[:, :text_seq_len], hidden_states[:, text_seq_len:]), proj_output
    parts = proj_output[:, :text_seq_len], proj_output[:, text_seq_len:]
    outputs = tuple(_clipped(stream + gate * part) for stream, part in zip(residuals, parts, strict=True))
    return outputs, proj_output


def _clipped(hidden_states: torch.Tensor) -> torch.Tensor:
    """float16 clipped to its range, as diffusers' single block does; other dtypes as they are."""
    return hidden_states.clip(-65504, 65504) if hidden_states.dtype == torch.float16 else hidden_states


def tiny_random_flux_pipeline(seed: int = 0) -> FluxPipeline:
    """A FluxPipeline of tiny random components, built offline: same classes and code path as FLUX."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )  # fmt: skip
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=32, hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=77, projection_dim=32, bos_token_id=0, eos_token_id=1, pad_token_id=0,
    ))  # fmt: skip
    t5 = T5EncoderModel(T5Config(
        vocab_size=32, d_model=32, d_ff=37, d_kv=8, num_heads=4, num_layers=2, decoder_start_token_id=0,
    ))  # fmt: skip
    vae = AutoencoderKL(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
        latent_channels=1, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.0609, scaling_factor=1.5035,
    )  # fmt: skip
    evaluated(transformer, clip, t5, vae)
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=clip,
        tokenizer=word_tokenizer(77),
        text_encoder_2=t5,
        tokenizer_2=word_tokenizer(16),
        transformer=transformer,
    )
