"""How many bytes a method's cache holds: every tensor its hooks keep between calls."""

from __future__ import annotations

from typing import Any

import torch

from lbridge.methods.base import CacheMethod
from lbridge.runtime.context import CacheRuntime
from lbridge.runtime.schedule import Schedule

#: Reached from hooks but not cache: model weights (bridge copies share them), the runtime, callables.
_SKIP = (torch.nn.Module, CacheRuntime, Schedule, type, torch.dtype, torch.device)


def cache_bytes(method: CacheMethod) -> int:
    """Bytes of the distinct tensor storages reachable from the method's hooks (weights excluded)."""
    storages: dict[int, int] = {}
    seen: set[int] = set()
    stack: list[Any] = [hook for _, hook in method._hooks]
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
