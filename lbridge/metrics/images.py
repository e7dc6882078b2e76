"""Image batches for the torchmetrics-style metrics: PIL images <-> uint8 (N, C, H, W) tensors."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lbridge.errors import LbridgeError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
Images = torch.Tensor | Sequence[Image.Image]


def to_uint8(images: Sequence[Image.Image]) -> torch.Tensor:
    """RGB uint8 (N, 3, H, W); every image must have the size of the first."""
    arrays = [np.asarray(im.convert("RGB")) for im in images]
    if len({a.shape for a in arrays}) > 1:
        raise LbridgeError(f"images of different sizes in one batch: {sorted({a.shape for a in arrays})}")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def as_uint8(images: Images) -> torch.Tensor:
    return images if isinstance(images, torch.Tensor) else to_uint8(images)


def as_pil(images: Images) -> list[Image.Image]:
    """PIL images from a uint8 (N, C, H, W) tensor (C = 1 or 3) or a sequence of PIL images."""
    if not isinstance(images, torch.Tensor):
        return [im.convert("RGB") for im in images]
    if images.dtype != torch.uint8:
        raise LbridgeError(f"image tensors must be uint8 (N, C, H, W), got {images.dtype}")
    arrays = images.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arrays]


def image_dir(path: str | Path, key: str) -> list[Image.Image]:
    """Every image file directly in a directory, sorted by name (a real set for FID/KID)."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise LbridgeError(f"{key}={path} is not a directory")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise LbridgeError(f"{key}={path} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return [Image.open(p) for p in files]
