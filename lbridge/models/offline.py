"""Building blocks of the tiny random-weight pipelines (`random_weights: true`): no hub files needed.

Each real model family can be built at toy size with the same diffusers classes, so tests and dry
runs go through exactly the code path of the real model, offline and in seconds on a CPU.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

WORDS = "a an the of and with in on red blue green cat dog car photo video".split()


def word_tokenizer(max_length: int, specials: Iterable[str] = ()):
    """An offline word-level tokenizer with the call interface the pipelines use.

    Id 0 is padding and id 1 unknown words (so a prompt of unknown words still has a non-empty
    attention mask); `specials` (e.g. a chat template's markers) get ids of their own.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocabulary = ["<pad>", "<unk>", *WORDS, *specials]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocabulary)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", model_max_length=max_length
    )


def vocabulary_size(specials: Iterable[str] = ()) -> int:
    return 2 + len(WORDS) + len(list(specials))


def evaluated(*modules: torch.nn.Module) -> None:
    """Freshly built modules are in training mode: dropout would randomise prompts and outputs."""
    for module in modules:
        module.eval()


def placed(pipe, device: torch.device, dtype: torch.dtype):
    """Move a freshly built float32 pipeline; cast only when asked (casting warns for some models)."""
    pipe = pipe.to(device)
    return pipe if dtype == torch.float32 else pipe.to(dtype)
