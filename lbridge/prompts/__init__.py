"""Prompt sets: each config in conf/prompts/ instantiates one of these readers."""

from lbridge.prompts.readers import DigitPrompts, Prompt, TextFilePrompts, load_prompts

__all__ = ["DigitPrompts", "Prompt", "TextFilePrompts", "load_prompts"]
