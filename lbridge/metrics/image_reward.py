"""ImageReward v1.0 (Xu et al., NeurIPS 2023) rebuilt from transformers' BLIP components.

The `image-reward` package does not import with transformers 5 (it needs the `clip` module,
`pkg_resources` and transformers' removed `apply_chunking_to_forward`), so the published model is
rebuilt here from its description and loaded from its public checkpoint (THUDM/ImageReward,
`ImageReward.pt`; a state dict read with `torch.load(weights_only=True)`, or a safetensors copy):

- image: BLIP's ViT-L/16 at 224 px (24 layers, width 1024, 16 heads, LayerNorm eps 1e-6), all tokens
  after the final norm -> transformers' `BlipVisionModel` (same fused qkv attention);
- text: BERT-base (12 layers, width 768, vocab 30524 = bert-base-uncased + [DEC] + [ENC]) with a
  cross-attention to the image tokens in every layer -> transformers' `BlipTextModel` (no pooler);
  the prompt is tokenised with bert-base-uncased, padded/truncated to 35 tokens;
- head: the text output at [CLS] through Linear 768-1024-128-64-16-1 (no activations; dropout only
  in training), then reward = (head - 0.16717362830052426) / 1.0333394966054072, the published
  normalisation (mean/std of the head over the ImageReward training set).

Images are resized (bicubic, shorter side) and centre-cropped to 224, then normalised with CLIP's
mean/std, as the published scorer does. `lbridge eval` reports the mean reward over the samples.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torchmetrics import Metric
from torchvision import transforms
from transformers import BlipTextConfig, BlipVisionConfig
from transformers.models.blip.modeling_blip import BlipVisionModel
from transformers.models.blip.modeling_blip_text import BlipTextModel

from lbridge.errors import LbridgeError
from lbridge.metrics.images import Images, as_pil
from lbridge.metrics.weights import hf_hub_file, load_state_dict, weights_error

HUB_REPO, HUB_FILE = "THUDM/ImageReward", "ImageReward.pt"
REWARD_MEAN, REWARD_STD = 0.16717362830052426, 1.0333394966054072
HEAD_WIDTHS = (768, 1024, 128, 64, 16, 1)
MAX_PROMPT_TOKENS = 35
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)

#: Published sizes (BLIP ViT-L image encoder, BERT-base text encoder with cross-attention).
VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
              image_size=224, patch_size=16, layer_norm_eps=1e-6, hidden_act="gelu")  # fmt: skip
TEXT = dict(vocab_size=30524, hidden_size=768, encoder_hidden_size=1024, intermediate_size=3072,
            num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=512,
            layer_norm_eps=1e-12, hidden_act="gelu", pad_token_id=0)  # fmt: skip

#: Checkpoint name prefix <-> lbridge module prefix, first match wins; {n} is a layer index. The
#: text encoder's names are BLIP's own (transformers kept them); the vision encoder's are renamed.
RENAMES = [
    ("blip.visual_encoder.cls_token", "vision.embeddings.class_embedding"),
    ("blip.visual_encoder.pos_embed", "vision.embeddings.position_embedding"),
    ("blip.visual_encoder.patch_embed.proj.", "vision.embeddings.patch_embedding."),
    ("blip.visual_encoder.blocks.{n}.norm1.", "vision.encoder.layers.{n}.layer_norm1."),
    ("blip.visual_encoder.blocks.{n}.attn.qkv.", "vision.encoder.layers.{n}.self_attn.qkv."),
    ("blip.visual_encoder.blocks.{n}.attn.proj.", "vision.encoder.layers.{n}.self_attn.projection."),
    ("blip.visual_encoder.blocks.{n}.norm2.", "vision.encoder.layers.{n}.layer_norm2."),
    ("blip.visual_encoder.blocks.{n}.mlp.", "vision.encoder.layers.{n}.mlp."),
    ("blip.visual_encoder.norm.", "vision.post_layernorm."),
    ("blip.text_encoder.", "text."),
    # The published head is nn.Sequential(Linear, Dropout, Linear, Dropout, Linear, Dropout, Linear, Linear).
    *[(f"mlp.layers.{old}.", f"head.{new}.") for new, old in enumerate((0, 2, 4, 6, 7))],
]


def _rename(name: str, source: int) -> str | None:
    """`name` in the other naming (source 0: checkpoint -> lbridge, 1: lbridge -> checkpoint)."""
    for pair in RENAMES:
        pattern = re.escape(pair[source]).replace(re.escape("{n}"), r"(\d+)")
        if match := re.match(pattern, name):
            index = match.groups()
            return pair[1 - source].replace("{n}", index[0] if index else "") + name[match.end() :]
    return None


def from_checkpoint(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Checkpoint tensors under lbridge's names, and the checkpoint names that have none."""
    converted, unused = {}, []
    for name, tensor in state.items():
        new = _rename(name, 0)
        if new is None:
            unused.append(name)
        else:
            converted[new] = tensor
    return converted, unused


def to_checkpoint(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """lbridge's state dict under the published checkpoint's names (tests write random checkpoints)."""
    return {_rename(name, 1): tensor for name, tensor in state.items()}


class RewardModel(nn.Module):
    """BLIP image encoder -> BERT text encoder cross-attending to it -> linear head on [CLS]."""

    def __init__(self, vision: dict | None = None, text: dict | None = None):
        super().__init__()
        vision_config = BlipVisionConfig(**(vision or VISION))
        text_config = BlipTextConfig(**(text or TEXT), is_decoder=True)  # is_decoder: build cross-attention
        vision_config._attn_implementation = text_config._attn_implementation = "eager"
        self.vision = BlipVisionModel(vision_config)
        self.text = BlipTextModel(text_config, add_pooling_layer=False)
        widths = (text_config.hidden_size, *HEAD_WIDTHS[1:])
        self.head = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True))
        self.image_size = vision_config.image_size

    def preprocess(self, images: Images) -> torch.Tensor:
        size = self.image_size
        transform = transforms.Compose([
            transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(size), transforms.ToTensor(), transforms.Normalize(CLIP_MEAN, CLIP_STD),
        ])  # fmt: skip
        return torch.stack([transform(im) for im in as_pil(images)])

    def head_output(self, pixels: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Un-normalised head value per image (N,)."""
        image_tokens = self.vision(pixel_values=pixels).last_hidden_state
        text = self.text(
            input_ids=input_ids,
            attention_mask=mask,
            encoder_hidden_states=image_tokens,
            encoder_attention_mask=torch.ones(image_tokens.shape[:2], dtype=torch.long, device=pixels.device),
            is_decoder=False,  # bidirectional self-attention, as BLIP's multimodal encoder
        ).last_hidden_state[:, 0]
        for linear in self.head:
            text = linear(text)
        return text.squeeze(-1)

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Normalised ImageReward per image (N,)."""
        return (self.head_output(pixels, input_ids, mask) - REWARD_MEAN) / REWARD_STD


def load_reward_model(path: str, key: str, model: RewardModel | None = None) -> RewardModel:
    """The published checkpoint (or a file of its layout) in a RewardModel; missing tensors are an error."""
    model = RewardModel() if model is None else model
    converted, _ = from_checkpoint(load_state_dict(path, key))
    expected = model.state_dict()
    missing = [name for name in expected if name not in converted]
    if missing:
        raise LbridgeError(f"{key}={path} is not an ImageReward checkpoint: {len(missing)} tensors missing, "
                           f"e.g. '{_rename(missing[0], 1)}'")  # fmt: skip
    for name, tensor in expected.items():
        if converted[name].shape != tensor.shape:
            raise LbridgeError(
                f"{key}={path}: '{_rename(name, 1)}' has shape {tuple(converted[name].shape)}, "
                f"expected {tuple(tensor.shape)}"
            )
    # Unused checkpoint tensors (BLIP's contrastive projections, BERT's position_ids buffer) are dropped.
    model.load_state_dict({name: converted[name] for name in expected})
    return model.eval()


def load_tokenizer(source: str, key: str, vocab_size: int = TEXT["vocab_size"]):
    """bert-base-uncased (hub id or local directory) with BLIP's two added tokens ([DEC], [ENC])."""
    from transformers import BertTokenizer

    try:
        tokenizer = BertTokenizer.from_pretrained(source)
    except Exception as err:
        raise weights_error(key, f"BERT tokenizer '{source}'", err) from None
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    # transformers 5 returns a tokenizer of only the special tokens when the files are missing.
    if len(tokenizer) != vocab_size:
        found = f"{len(tokenizer)} tokens with BLIP's two added, expected {vocab_size}"
        raise weights_error(key, f"BERT tokenizer '{source}'", found)
    return tokenizer


#: A toy layout of the same classes (random weights): the scorer's plumbing offline.
TOY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=32, patch_size=16, layer_norm_eps=1e-6)  # fmt: skip
TOY_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "an", "the", "of", "and", "with", "in",
             "on", "red", "blue", "green", "square", "cat", "dog", "car", "photo"]  # fmt: skip


def toy_tokenizer():
    """A word-level BERT tokenizer (offline stand-in for bert-base-uncased) with BLIP's added tokens."""
    from transformers import BertTokenizer

    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(TOY_WORDS)})
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    return tokenizer


def toy_reward_model(vocab_size: int, seed: int = 0) -> RewardModel:
    """RewardModel of the published classes at toy width, random weights."""
    text = dict(vocab_size=vocab_size, hidden_size=32, encoder_hidden_size=32, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
                layer_norm_eps=1e-12, pad_token_id=0, bos_token_id=None, sep_token_id=3)  # fmt: skip
    torch.manual_seed(seed)
    return RewardModel(TOY_VISION, text)


class ImageReward(Metric):
    """Mean ImageReward v1.0 of (image, prompt) pairs; `update(images, prompts)`, `compute()` -> scalar."""

    kind = "prompted"
    higher_is_better = True
    full_state_update = False

    def __init__(
        self,
        checkpoint_path: str | None = None,
        tokenizer_path: str = "bert-base-uncased",
        batch_size: int = 8,
        config_key: str = "metrics.image_reward",
        random_weights: bool = False,
        model: RewardModel | None = None,
        tokenizer: Callable | None = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.random_weights = random_weights
        if random_weights:  # plumbing only (tests, DRY_RUN tables): the description says so
            tokenizer = toy_tokenizer()
            model = toy_reward_model(len(tokenizer))
        if model is None:
            key = f"{config_key}.checkpoint_path"
            path = checkpoint_path or str(hf_hub_file(HUB_REPO, HUB_FILE, key, "ImageReward v1.0"))
            model = load_reward_model(path, key)
        vocab = model.text.config.vocab_size
        self.tokenizer = tokenizer or load_tokenizer(tokenizer_path, f"{config_key}.tokenizer_path", vocab)
        self.model, self.batch_size = model.eval(), batch_size
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0), dist_reduce_fx="sum")

    @property
    def description(self) -> str:
        weights = "toy layout, random weights (plumbing only)" if self.random_weights else HUB_REPO
        return f"ImageReward v1.0 ({weights}), reward = (head - {REWARD_MEAN:.4f}) / {REWARD_STD:.4f}"

    @torch.no_grad()
    def scores(self, images: Images, prompts: Sequence[str]) -> torch.Tensor:
        """Normalised reward of each image for its prompt (N,)."""
        pil = as_pil(images)
        if len(pil) != len(prompts):
            raise LbridgeError(f"ImageReward got {len(pil)} images and {len(prompts)} prompts")
        device = next(self.model.parameters()).device
        tokens = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                                max_length=MAX_PROMPT_TOKENS, return_tensors="pt")  # fmt: skip
        pixels = self.model.preprocess(pil).to(device)
        return self.model(pixels, tokens.input_ids.to(device), tokens.attention_mask.to(device))

    def update(self, images: Images, prompts: Sequence[str]) -> None:
        pil = as_pil(images)
        step = self.batch_size
        for start in range(0, len(pil), step):
            values = self.scores(pil[start : start + step], prompts[start : start + step])
            self.total += values.double().sum().to(self.total.device)
            self.count += len(values)

    def compute(self) -> torch.Tensor:
        return (self.total / self.count.clamp(min=1)).float()
