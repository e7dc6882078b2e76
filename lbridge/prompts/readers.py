"""Readers for prompt sets. Seeds are `seed + index`, the protocol of the caching papers."""

from __future__ import annotations

import json
from collections.abc import Sequence
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


def _prompt_file(path: str | Path, name: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise LbridgeError(f"prompts.path={path} is not a file: point prompts.path at the {name} list")
    return path


def _non_empty(texts: list[str], path: Path) -> list[str]:
    if not texts:
        raise LbridgeError(f"prompts.path={path} holds no prompts")
    return texts


class TextFilePrompts:
    """One prompt per line (DrawBench, PartiPrompts, ...), blank lines skipped."""

    def __init__(self, path: str, name: str = "file") -> None:
        self.path, self.name = Path(path), name

    def texts(self, count: int) -> list[str]:
        lines = _prompt_file(self.path, self.name).read_text(encoding="utf-8").splitlines()
        return _non_empty([line.strip() for line in lines if line.strip()], self.path)[:count]


class ListPrompts:
    """Prompts given in the config itself (`prompts.texts=[...]`): quick runs and dry runs."""

    def __init__(self, texts: Sequence[str], name: str = "list") -> None:
        self.prompts = [str(t).strip() for t in texts if str(t).strip()]

    def texts(self, count: int) -> list[str]:
        if not self.prompts:
            raise LbridgeError("prompts.texts is empty: give at least one prompt")
        return self.prompts[:count]


class CocoCaptions:
    """COCO-2017 captions (captions_val2017.json): the first caption of each image, by image id.

    One caption per image is the usual text-to-image FID protocol (PixArt-alpha, the caching papers);
    ordering by image id makes `num_prompts` slices and seeds stable across machines.
    """

    def __init__(self, path: str, name: str = "coco") -> None:
        self.path, self.name = Path(path), name

    def texts(self, count: int) -> list[str]:
        path = _prompt_file(self.path, self.name)
        try:
            annotations = json.loads(path.read_text(encoding="utf-8"))["annotations"]
            first: dict[int, str] = {}
            for item in sorted(annotations, key=lambda a: (a["image_id"], a["id"])):
                first.setdefault(item["image_id"], " ".join(item["caption"].split()))
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise LbridgeError(
                f"prompts.path={path} is not a COCO captions file (captions_*.json with "
                f"annotations[].image_id/id/caption): {type(err).__name__} {err}"
            ) from None
        return _non_empty(list(first.values()), path)[:count]


class VBenchPrompts:
    """VBench prompt lists: a plain text file (prompts/all_dimension.txt, one per line) or
    VBench_full_info.json (entries with `prompt_en` and `dimension`), optionally one dimension only."""

    def __init__(self, path: str, dimension: str | None = None, name: str = "vbench") -> None:
        self.path, self.dimension, self.name = Path(path), dimension, name

    def texts(self, count: int) -> list[str]:
        path = _prompt_file(self.path, self.name)
        if path.suffix != ".json":
            if self.dimension is not None:
                raise LbridgeError(
                    f"prompts.dimension={self.dimension} needs VBench_full_info.json, not {path.name}"
                )
            return TextFilePrompts(str(path), self.name).texts(count)
        try:
            entries = json.loads(path.read_text(encoding="utf-8"))
            texts = [e["prompt_en"] for e in entries if self.dimension in (None, *e.get("dimension", []))]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise LbridgeError(
                f"prompts.path={path} is not VBench_full_info.json (a list of {{prompt_en, dimension}}): "
                f"{type(err).__name__} {err}"
            ) from None
        if not texts and self.dimension is not None:
            known = sorted({d for e in entries for d in e.get("dimension", [])})
            raise LbridgeError(f"unknown prompts.dimension '{self.dimension}' (accepted: {', '.join(known)})")
        return _non_empty(texts, path)[:count]


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
