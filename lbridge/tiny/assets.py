"""Where the committed tiny-model assets live, and how to load them."""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "assets"
TINY_PIPELINE = ASSETS / "tiny-digits"
DIGIT_CLASSIFIER = ASSETS / "digit-classifier"


def load_digit_classifier(path: str | Path = DIGIT_CLASSIFIER):
    from lbridge.tiny.classifier import DigitClassifier

    return DigitClassifier.from_pretrained(path).eval()
