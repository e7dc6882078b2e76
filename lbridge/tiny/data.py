"""scikit-learn's bundled 8x8 digits, upsampled to the tiny model's 16x16 and scaled to [-1, 1]."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from lbridge.tiny.pipeline import IMAGE_SIZE
from lbridge.tiny.text_encoder import DIGIT_WORDS


def digits_16() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as (N, 1, 16, 16) float tensors in [-1, 1] and (N,) labels."""
    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return images.clamp(0, 1) * 2 - 1, torch.tensor(bunch.target, dtype=torch.long)


def random_shift(images: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Translate each image by up to `max_shift` pixels (background is -1): cheap augmentation."""
    padded = F.pad(images, [max_shift] * 4, value=-1.0)
    out = torch.empty_like(images)
    offsets = torch.randint(0, 2 * max_shift + 1, (images.shape[0], 2), generator=generator)
    size = images.shape[-1]
    for i, (dy, dx) in enumerate(offsets.tolist()):
        out[i] = padded[i, :, dy : dy + size, dx : dx + size]
    return out


def class_prompt(label: int, spelled: bool = False) -> str:
    """The tiny model's prompt for a class, e.g. 'a handwritten digit 7'."""
    return f"a handwritten digit {DIGIT_WORDS[label] if spelled else label}"
