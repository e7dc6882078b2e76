"""Readers for prompt sets. Seeds are `seed + index`, the protocol of the caching papers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from lbridge.config import instantiate_node
from lbridge.errors import LbridgeError
from lbridge.tiny.data import class_prompt


@dataclass(frozen=True)
class Prompt:
    index: int
    text: str
    seed: int


class DigitPrompts:
    """Class prompts for the tiny model, cycling through the digits: 'a handwritten digit 0', ..."""

    def __init__(self, name: str = "digits", offset: int = 0) -> None:
        self.offset = offset

    def texts(self, count: int) -> list[str]:
        return [class_prompt((self.offset + i) % 10) for i in range(count)]


class TextFilePrompts:
    """One prompt per line (DrawBench, PartiPrompts, ...), blank lines skipped."""

    def __init__(self, path: str, name: str = "file") -> None:
        self.path, self.name = Path(path), name

    def texts(self, count: int) -> list[str]:
        if not self.path.is_file():
            raise LbridgeError(
                f"prompts.path={self.path} is not a file: point prompts.path at the {self.name} list"
            )
        lines = [line.strip() for line in self.path.read_text(encoding="utf-8").splitlines()]
        lines = [line for line in lines if line]
        if not lines:
            raise LbridgeError(f"prompts.path={self.path} holds no prompts")
        return lines[:count]


def load_prompts(cfg: DictConfig, num_prompts: int, seed: int) -> list[Prompt]:
    if int(num_prompts) < 1:
        raise LbridgeError(f"num_prompts={num_prompts} must be >= 1")
    reader = instantiate_node(cfg, "prompts")  # a bad key or value: one line, not a traceback
    try:
        texts = reader.texts(int(num_prompts))
    except (TypeError, ValueError) as err:  # e.g. prompts.offset=abc reaches the arithmetic
        raise LbridgeError(f"bad prompts config '{cfg.get('name')}': {err}") from None
    return [Prompt(i, text, int(seed) + i) for i, text in enumerate(texts)]


class ClassIdPrompts:
    """Class ids as prompts for class-conditional models (DiT on ImageNet): '0', '1', ... cycling.

    Cycling through all classes is the FID-50k protocol's class balance (50 samples per class).
    """

    def __init__(self, name: str = "imagenet", num_classes: int = 1000, offset: int = 0) -> None:
        if int(num_classes) < 1:
            raise LbridgeError(f"prompts.num_classes={num_classes} must be >= 1")
        self.num_classes, self.offset = int(num_classes), int(offset)

    def texts(self, count: int) -> list[str]:
        return [str((self.offset + i) % self.num_classes) for i in range(count)]
