"""Train the embedded tiny model (lbridge/assets/tiny-digits): flow matching on 16x16 digits.

    .venv/bin/python scripts/train_tiny.py            # ~5 minutes on 2 CPU cores

The denoiser is diffusers' FluxTransformer2DModel at a tiny config, so the tiny model runs the same
adapter code path as FLUX.1. Fixed seed; at the end the script samples 100 digits per class and
prints the shipped digit classifier's accuracy on them (train the classifier first:
scripts/train_classifier.py).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

from lbridge.metrics.digit_accuracy import class_accuracy
from lbridge.tiny.assets import TINY_PIPELINE
from lbridge.tiny.data import class_prompt, digits_16, random_shift
from lbridge.tiny.pipeline import TinyDigitsPipeline, image_ids, pack
from lbridge.tiny.text_encoder import DigitPromptEncoder

TRANSFORMER_CONFIG = dict(
    patch_size=1,
    in_channels=4,  # 1 grayscale channel x 2x2 patch packing, as FLUX packs 16 latent channels into 64
    num_layers=2,
    num_single_layers=4,
    attention_head_dim=16,
    num_attention_heads=4,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    guidance_embeds=False,
    axes_dims_rope=(4, 6, 6),
)


def build_pipeline() -> TinyDigitsPipeline:
    return TinyDigitsPipeline(
        transformer=FluxTransformer2DModel(**TRANSFORMER_CONFIG),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0),
        text_encoder=DigitPromptEncoder(dim=TRANSFORMER_CONFIG["joint_attention_dim"]),
    )


def training_step(pipe, images, labels, gen, cfg_dropout: float) -> torch.Tensor:
    n = len(images)
    spelled = torch.rand(n, generator=gen) < 0.5
    prompts = [class_prompt(int(y), bool(s)) for y, s in zip(labels, spelled, strict=True)]
    # Dropping the prompt teaches the unconditional branch used by classifier-free guidance.
    prompts = [p if torch.rand(1, generator=gen).item() >= cfg_dropout else "" for p in prompts]
    embeds, pooled, text_ids = pipe.encode_prompt(prompts)
    x0 = pack(random_shift(images, gen))
    noise = torch.randn(x0.shape, generator=gen)
    sigma = torch.sigmoid(torch.randn(n, generator=gen))  # logit-normal, as SD3/FLUX training
    xt = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise
    pred = pipe.transformer(
        hidden_states=xt,
        timestep=sigma,
        pooled_projections=pooled,
        encoder_hidden_states=embeds,
        txt_ids=text_ids,
        img_ids=image_ids(),
        return_dict=False,
    )[0]
    return torch.nn.functional.mse_loss(pred, noise - x0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cfg-dropout", type=float, default=0.1)
    parser.add_argument("--out", type=Path, default=TINY_PIPELINE)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    images, labels = digits_16()
    pipe = build_pipeline()
    params = list(pipe.transformer.parameters()) + list(pipe.text_encoder.parameters())
    print(f"parameters: {sum(p.numel() for p in params) / 1e6:.2f} M")
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / 200) * 0.5 * (1 + math.cos(math.pi * i / args.steps))
    )
    start, running = time.perf_counter(), 0.0
    for step in range(args.steps):
        batch = torch.randint(0, len(images), (args.batch,), generator=gen)
        loss = training_step(pipe, images[batch], labels[batch], gen, args.cfg_dropout)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        schedule.step()
        running = 0.98 * running + 0.02 * loss.item() if step else loss.item()
        if (step + 1) % 500 == 0:
            print(f"step {step + 1:5d}  loss {running:.4f}  {time.perf_counter() - start:.0f}s", flush=True)
    print(f"trained in {time.perf_counter() - start:.0f}s")
    pipe.transformer.eval()
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(args.out, safe_serialization=True)
    print(f"saved to {args.out}")
    for guidance in (1.0, 2.0, 3.0):
        acc = class_accuracy(pipe, per_class=100, num_inference_steps=20, guidance_scale=guidance)
        print(f"classifier accuracy, 100 samples per class, 20 steps, guidance {guidance}: {acc:.3f}")


if __name__ == "__main__":
    main()
