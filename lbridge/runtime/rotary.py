"""Rotary position embeddings computed once per sample and CFG branch, not once per call.

A transformer call recomputes its rotary embedding from inputs that stay fixed for the whole sample
(FLUX's text and image position ids; the latent's shape for Wan and HunyuanVideo). On a CACHED step
of a stack method that is most of what the call dispatches besides the embeddings and the head:
65 of the 104 ATen operations of a FLUX CACHED call, ~0.26 ms of host time on the 2-core CPU
(docs/design.md, "Overheads removed"), and on a GPU host time a nearly empty call cannot hide.

The hook on the rotary module returns the output it computed at the branch's previous call when the
inputs that determine it (`ModelAdapter.rotary_inputs`) are the same: tensors by identity and version
counter (the same object, not written since: no device comparison, no host sync), anything else by
equality. Inputs it cannot vouch for (a tensor without a version counter, made under
`torch.inference_mode`) are computed every call. Exact: the reused output is what the module computed
from those very inputs, so every image is bit-identical with and without it (tested), which is why it
is always on. diffusers does the same inside Qwen-Image's rotary module (an `lru_cache` on its
frequencies).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from lbridge.runtime.context import CacheRuntime
from lbridge.runtime.hooks import ModelHook, register, remove_all

ROTARY_HOOK = "lbridge.rotary"


@dataclass
class RotaryEntry:
    """One branch's rotary output and the inputs it came from (held: their ids stay theirs)."""

    inputs: tuple
    versions: tuple
    output: Any


def versions(inputs: tuple) -> tuple | None:
    """Each tensor's version counter (None for other values); None if some tensor has none."""
    try:
        return tuple(v._version if isinstance(v, torch.Tensor) else None for v in inputs)
    except RuntimeError:  # inference tensors track no version: their contents cannot be vouched for
        return None


def same_inputs(entry: RotaryEntry, inputs: tuple, current: tuple) -> bool:
    """`inputs` (of version counters `current`) are the entry's: tensors the same objects, unwritten."""
    if entry.versions != current:  # one counter slot per input: a different count differs here too
        return False
    for kept, new in zip(entry.inputs, inputs, strict=True):
        if isinstance(kept, torch.Tensor) or isinstance(new, torch.Tensor):
            if kept is not new:
                return False
        elif kept != new:
            return False
    return True


class ReuseRotaryHook(ModelHook):
    """On the transformer's rotary module: recompute only when the inputs that determine it change."""

    def __init__(self, runtime: CacheRuntime, adapter: Any) -> None:
        super().__init__()
        self.runtime, self.adapter = runtime, adapter
        self.entries: dict[str, RotaryEntry] = {}
        self.computed = 0  # calls that ran the module (tests and diagnostics)

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        inputs = self.adapter.rotary_inputs(self.runtime.call_arguments, args, kwargs)
        if inputs is not None:  # its buffers too: a `.to()` of the model makes new ones
            inputs = (*inputs, *module.buffers())
        current = versions(inputs) if inputs is not None else None
        branch = self.runtime.branch
        entry = self.entries.get(branch)
        if entry is not None and current is not None and same_inputs(entry, inputs, current):
            return entry.output
        output = self.fn_ref.original_forward(*args, **kwargs)
        self.computed += 1
        if current is None:
            self.entries.pop(branch, None)
        else:
            self.entries[branch] = RotaryEntry(inputs, current, output)
        return output

    def reset(self) -> None:
        self.entries.clear()


@dataclass
class RotaryCache:
    """The rotary hook on one transformer, when its adapter names a rotary module."""

    runtime: CacheRuntime
    hooks: list[ReuseRotaryHook] = field(default_factory=list)

    def attach(self, transformer: torch.nn.Module, adapter: Any) -> None:
        module = adapter.rotary_embedding(transformer)
        if module is not None:
            self.hooks = [register(module, ReuseRotaryHook(self.runtime, adapter), ROTARY_HOOK)]

    def detach(self, transformer: torch.nn.Module) -> None:
        if self.hooks:
            remove_all(transformer, [ROTARY_HOOK])
        self.hooks = []

    def reset(self) -> None:
        for hook in self.hooks:
            hook.reset()
