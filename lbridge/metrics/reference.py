"""PSNR and SSIM of an image against its same-seed full-compute reference (scikit-image)."""

from __future__ import annotations

import numpy as np
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("L") if image.mode == "L" else image.convert("RGB"))


def psnr(image: Image.Image, reference: Image.Image) -> float:
    """dB, data range 255; +inf for identical images."""
    a, b = _pixels(image), _pixels(reference)
    if np.array_equal(a, b):
        return float("inf")
    return float(peak_signal_noise_ratio(b, a, data_range=255))


def ssim(image: Image.Image, reference: Image.Image) -> float:
    """Structural similarity (Gaussian-free 7x7 window, scikit-image defaults), channels averaged."""
    a, b = _pixels(image), _pixels(reference)
    channel_axis = None if a.ndim == 2 else -1
    return float(structural_similarity(b, a, data_range=255, channel_axis=channel_axis))
