"""The cost model counts FLOPs with torch's FlopCounterMode, attention included on CPU."""

import torch
import torch.nn.functional as F

import lbridge
from lbridge.runtime.cost import count_flops


def test_attention_is_counted_on_cpu():
    q = torch.randn(1, 4, 64, 16)
    flops = count_flops(lambda: F.scaled_dot_product_attention(q, q, q))
    assert flops == 2 * 2 * 4 * 64 * 64 * 16  # QK^T and AV, each 2*h*s*s*d


def flux_hand_count(cfg, n_img: int, n_txt: int) -> int:
    """Multiply-adds x 2 of every linear layer and of attention in one FluxTransformer2DModel call."""
    d = cfg.num_attention_heads * cfg.attention_head_dim
    n = n_img + n_txt
    embed = 2 * n_img * cfg.in_channels * d + 2 * n_txt * cfg.joint_attention_dim * d
    time_text = 2 * (256 * d + d * d) * (2 if cfg.guidance_embeds else 1) + 2 * (
        cfg.pooled_projection_dim * d + d * d
    )
    double = 24 * d * d + 24 * n * d * d + 4 * n * n * d  # 2 AdaLN-Zero, qkv/out on both streams, 2 FFN
    single = 6 * d * d + 24 * n * d * d + 4 * n * n * d  # AdaLN, qkv, proj_mlp, proj_out (5d -> d)
    head = 4 * d * d + 2 * n_img * d * cfg.in_channels
    return embed + time_text + cfg.num_layers * double + cfg.num_single_layers * single + head


def test_full_step_flops_match_a_hand_count(random_flux):
    adapter, pipe = random_flux
    acc = lbridge.accelerate(pipe, "none", 1.0, adapter=adapter, prompt="a cat", **adapter.pipeline_kwargs())
    acc.remove()
    n_img = (32 // 2) ** 2  # 32x32 latents (VAE factor 1 here), 2x2 packing
    expected = flux_hand_count(pipe.transformer.config, n_img, 16)
    assert abs(acc.cost.full - expected) / expected < 0.05
    assert acc.cost.cached == acc.cost.full  # full compute has no cheaper step


def test_cached_step_of_fora_stack_costs_only_embeddings_and_head(random_flux):
    adapter, pipe = random_flux
    acc = lbridge.accelerate(pipe, "fora", 2.0, adapter=adapter, prompt="a cat", **adapter.pipeline_kwargs())
    acc.remove()
    assert 0 < acc.cost.cached < 0.05 * acc.cost.full
