"""The embedded tiny model draws the digit it is asked for, and its prompts round-trip."""

import torch

from lbridge.metrics.digit_accuracy import digit_accuracy, prompt_label
from lbridge.tiny.data import class_prompt


def test_samples_are_recognisable_digits(tiny):
    adapter, pipe = tiny
    images, prompts = [], []
    for label in range(10):
        batch = [class_prompt(label)] * 5
        gens = [torch.Generator().manual_seed(100 * label + i) for i in range(5)]
        images += pipe(batch, generator=gens, **adapter.pipeline_kwargs()).images
        prompts += batch
    assert digit_accuracy(images, prompts) >= 0.95


def test_prompt_labels():
    assert prompt_label("a handwritten digit 7") == 7
    assert prompt_label("the number seven") == 7
    assert [prompt_label(class_prompt(d, spelled=True)) for d in range(10)] == list(range(10))


def test_unknown_words_do_not_break_the_text_encoder(tiny):
    _, pipe = tiny
    embeds, pooled = pipe.text_encoder(["a purple giraffe 3", ""])
    assert embeds.shape == (2, 8, 32) and pooled.shape == (2, 32)
