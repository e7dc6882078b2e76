"""How many bytes an accelerator holds beyond the model: every tensor its hooks keep between calls.

That is the method's cache; with `modulation=batched`, the sample's step tables (the embedding
and every modulation's output for all steps: ~100 MB in bf16 at FLUX.1-dev's 50 steps), which full
compute holds too when it runs batched; and the rotary embedding kept per CFG branch (its output
only: the inputs it keeps a reference to are the pipeline's; FLUX.1-dev at 1024px: 4.7 MB)."""

from __future__ import annotations

from typing import Any

import torch

from lbridge.api import Accelerator
from lbridge.runtime.context import CacheRuntime
from lbridge.runtime.schedule import Schedule

#: Reached from hooks but not cache: model weights (bridge copies share them), the runtime, callables.
_SKIP = (torch.nn.Module, CacheRuntime, Schedule, type, torch.dtype, torch.device)


def cache_bytes(acc: Accelerator) -> int:
    """Bytes of the distinct tensor storages reachable from the accelerator's hooks (weights excluded)."""
    storages: dict[int, int] = {}
    seen: set[int] = set()
    rotary_hooks = acc.rotary.hooks if acc.rotary is not None else []
    rotary = [entry.output for hook in rotary_hooks for entry in hook.entries.values()]
    # `batched_modulation`: None, or its step embedding hook and each modulation's tables.
    stack: list[Any] = [*(hook for _, hook in acc.method._hooks), acc.batched_modulation, *rotary]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, _SKIP) or callable(obj) and not hasattr(obj, "__dict__"):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if not isinstance(obj, torch.nn.Parameter):
                storage = obj.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, list | tuple | set | frozenset):
            stack.extend(obj)
        elif hasattr(obj, "__dict__") and not isinstance(obj, str):
            stack.extend(v for k, v in vars(obj).items() if k != "fn_ref")
    return sum(storages.values())
