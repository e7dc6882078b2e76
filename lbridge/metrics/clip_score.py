"""CLIP score with open_clip: 100 * max(cos(E_image(x), E_text(prompt)), 0), averaged over images.

CLIP scores are not comparable across papers unless the backbone, its pretrained tag and the scale
match, so the model, the tag and this formula are part of the metric's description, which
`lbridge eval` writes to metrics.json (`metric_notes`) and `lbridge report` prints above every table.
The default, ViT-L-14 / openai, is the backbone of torchmetrics' CLIPScore
(openai/clip-vit-large-patch14, same scale 100 * max(cos, 0)), which most diffusion evaluations that
report "CLIP score" with torchmetrics use; ViT-H-14 / laion2b_s32b_b79k is the other common choice
(e.g. as the backbone of HPSv2 and PickScore). Hessel et al.'s original CLIPScore is
2.5 * max(cos, 0) with ViT-B/32: divide by 40 to compare.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torchmetrics import Metric

from lbridge.errors import LbridgeError
from lbridge.metrics.images import Images, as_pil
from lbridge.metrics.weights import local_file, weights_error

FORMULA = "100 * max(cos(image_emb, text_emb), 0)"


def clip_score(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """Per pair: 100 * max(cos(image_embeds[i], text_embeds[i]), 0)."""
    cos = torch.nn.functional.cosine_similarity(image_embeds.double(), text_embeds.double(), dim=-1)
    return 100 * cos.clamp(min=0)


def load_open_clip(model_name: str, pretrained: str, checkpoint_path: str | None, node: str):
    """(model, preprocess, tokenizer) with pretrained weights, or one line naming `<node>.checkpoint_path`."""
    import open_clip

    if model_name not in open_clip.list_models():
        raise LbridgeError(f"unknown {node}.model_name '{model_name}' (see open_clip.list_models())")
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if checkpoint_path is None and pretrained not in tags:
        accepted = ", ".join(tags)
        raise LbridgeError(
            f"unknown {node}.pretrained '{pretrained}' for {model_name} (accepted: {accepted})"
        )
    key = f"{node}.checkpoint_path"
    source = str(local_file(checkpoint_path, key)) if checkpoint_path else pretrained
    logging.disable(logging.ERROR)  # open_clip logs each failed download: the error below says it once
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=source)
    except Exception as err:  # the hub download or its cache lookup failed: say which key fixes it
        raise weights_error(key, f"open_clip {model_name}/{pretrained}", err) from None
    finally:
        logging.disable(logging.NOTSET)
    return model.eval(), preprocess, open_clip.get_tokenizer(model_name)


def random_open_clip(seed: int = 0):
    """(model, preprocess, tokenizer) of a toy open_clip CLIP with random weights and the real BPE
    tokenizer (shipped inside open_clip): the metric's plumbing offline (tests, DRY_RUN tables)."""
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(seed)
    model = open_clip.CLIP(
        embed_dim=16,
        vision_cfg=CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=32),
        text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=1),
    )
    return model.eval(), open_clip.image_transform(32, is_train=False), open_clip.get_tokenizer("ViT-B-32")


class CLIPScore(Metric):
    """Mean CLIP score of (image, prompt) pairs; `update(images, prompts)`, `compute()` -> scalar.

    `model`, `preprocess` and `tokenizer` may be given directly; otherwise they are built from
    `model_name`/`pretrained` or a local `checkpoint_path`, or, with `random_weights`, a toy random
    CLIP (plumbing only: the description then says "toy / random").
    """

    kind = "prompted"
    higher_is_better = True
    full_state_update = False

    def __init__(
        self,
        model_name: str = "ViT-L-14",
        pretrained: str = "openai",
        checkpoint_path: str | None = None,
        batch_size: int = 32,
        config_key: str = "metrics.clip_score",
        random_weights: bool = False,
        model: nn.Module | None = None,
        preprocess: Callable | None = None,
        tokenizer: Callable | None = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        if random_weights:  # no pretrained tag to claim: the description says "random"
            (model, preprocess, tokenizer), model_name, pretrained = random_open_clip(), "toy", "random"
        if model is None:
            model, preprocess, tokenizer = load_open_clip(model_name, pretrained, checkpoint_path, config_key)
        self.model, self.preprocess, self.tokenizer = model.eval(), preprocess, tokenizer
        self.model_name, self.pretrained, self.batch_size = model_name, pretrained, batch_size
        self.add_state("score_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0), dist_reduce_fx="sum")

    @property
    def description(self) -> str:
        return f"CLIP score = {FORMULA}, open_clip {self.model_name} / {self.pretrained}"

    @torch.no_grad()
    def embeddings(self, images: Images, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        pil = as_pil(images)
        if len(pil) != len(prompts):
            raise LbridgeError(f"CLIP score got {len(pil)} images and {len(prompts)} prompts")
        device = next(self.model.parameters()).device
        pixels = torch.stack([self.preprocess(im) for im in pil]).to(device)
        tokens = self.tokenizer(list(prompts)).to(device)
        return self.model.encode_image(pixels), self.model.encode_text(tokens)

    def update(self, images: Images, prompts: Sequence[str]) -> None:
        pil = as_pil(images)
        for start in range(0, len(pil), self.batch_size):
            end = start + self.batch_size
            scores = clip_score(*self.embeddings(pil[start:end], prompts[start:end]))
            self.score_sum += scores.sum().to(self.score_sum.device)
            self.count += len(scores)

    def compute(self) -> torch.Tensor:
        return (self.score_sum / self.count.clamp(min=1)).float()
