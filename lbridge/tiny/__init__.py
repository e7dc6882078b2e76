"""The embedded tiny model: a digits flow-matching pipeline built on diffusers' FluxTransformer2DModel."""

from lbridge.tiny.classifier import DigitClassifier
from lbridge.tiny.pipeline import TinyDigitsPipeline
from lbridge.tiny.text_encoder import DigitPromptEncoder

__all__ = ["DigitClassifier", "DigitPromptEncoder", "TinyDigitsPipeline"]
