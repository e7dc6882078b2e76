"""Accuracy of the shipped digit classifier on tiny-model samples: does the image show the prompted digit?"""

from __future__ import annotations

import re

import numpy as np
import torch
from PIL import Image

from lbridge.tiny.assets import load_digit_classifier
from lbridge.tiny.data import class_prompt
from lbridge.tiny.text_encoder import DIGIT_WORDS


def prompt_label(prompt: str) -> int:
    """The digit a prompt asks for: its last digit or digit word."""
    words = re.findall(r"[a-z0-9]+", prompt.lower())
    for word in reversed(words):
        if word.isdigit() and len(word) == 1:
            return int(word)
        if word in DIGIT_WORDS:
            return DIGIT_WORDS.index(word)
    raise ValueError(f"prompt '{prompt}' names no digit")


def images_to_tensor(images: list[Image.Image]) -> torch.Tensor:
    array = np.stack([np.asarray(im.convert("L").resize((16, 16)), dtype=np.float32) for im in images])
    return torch.from_numpy(array).unsqueeze(1) / 127.5 - 1


@torch.no_grad()
def digit_accuracy(images: list[Image.Image], prompts: list[str]) -> float:
    predictions = load_digit_classifier()(images_to_tensor(images)).argmax(1)
    labels = torch.tensor([prompt_label(p) for p in prompts])
    return float((predictions == labels).float().mean())


@torch.no_grad()
def class_accuracy(
    pipe, per_class: int, num_inference_steps: int, guidance_scale: float, seed: int = 1234
) -> float:
    """Classifier accuracy on `per_class` tiny-model samples of each digit (seeds seed, seed+1, ...)."""
    classifier = load_digit_classifier()
    correct = 0
    for label in range(10):
        gens = [torch.Generator().manual_seed(seed + label * per_class + i) for i in range(per_class)]
        images = pipe(
            [class_prompt(label)] * per_class,
            num_inference_steps,
            guidance_scale,
            generator=gens,
            output_type="pt",
        ).images
        correct += (classifier(images).argmax(1) == label).sum().item()
    return correct / (10 * per_class)
