"""Prompt sets: each config in conf/prompts/ instantiates one of these readers."""

from lbridge.prompts.readers import (
    ClassIdPrompts,
    CocoCaptions,
    DigitPrompts,
    ListPrompts,
    Prompt,
    TextFilePrompts,
    VBenchPrompts,
    load_prompts,
)

__all__ = [
    "ClassIdPrompts",
    "CocoCaptions",
    "DigitPrompts",
    "ListPrompts",
    "Prompt",
    "TextFilePrompts",
    "VBenchPrompts",
    "load_prompts",
]
