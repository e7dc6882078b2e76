"""A word-embedding text encoder that stands in for T5/CLIP in the tiny model.

It keeps the FLUX interface (a token sequence for joint attention plus a pooled vector for the
timestep/text modulation) so the tiny model exercises the same transformer code path as FLUX.
"""

from __future__ import annotations

import re

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DEFAULT_VOCAB = ["<pad>", "<unk>", "a", "an", "the", "handwritten", "digit", "number", "of", "image"]
DEFAULT_VOCAB += [str(d) for d in range(10)] + DIGIT_WORDS


class DigitPromptEncoder(ModelMixin, ConfigMixin):
    """Tokenises a prompt into words and embeds them; pooled output is the mean embedding."""

    @register_to_config
    def __init__(self, vocab: list[str] = DEFAULT_VOCAB, max_length: int = 8, dim: int = 32):
        super().__init__()
        self.token_to_id = {word: i for i, word in enumerate(vocab)}
        self.embedding = nn.Embedding(len(vocab), dim)
        self.pooled_proj = nn.Linear(dim, dim)

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        max_length = self.config.max_length
        unk, pad = self.token_to_id["<unk>"], self.token_to_id["<pad>"]
        rows = []
        for prompt in prompts:
            words = re.findall(r"[a-z0-9]+", prompt.lower())[:max_length]
            ids = [self.token_to_id.get(w, unk) for w in words]
            rows.append(ids + [pad] * (max_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long, device=self.embedding.weight.device)

    def forward(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.embedding(self.tokenize(prompts))
        return tokens, self.pooled_proj(tokens.mean(dim=1))
