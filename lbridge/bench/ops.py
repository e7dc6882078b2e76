"""How many ATen operations each transformer call dispatches: the host's share of a call's cost.

Eager PyTorch spends host time on every dispatched operation (Python, the dispatcher and, on CUDA,
a kernel launch), whatever its size. A CACHED call whose GPU work is small is bound by that host
time once the operations outnumber what the GPU can hide: the count is the device-free measure of
it (views included, which launch nothing but still cost dispatch). `dispatched_per_call` counts
what each call dispatches under any key (`bench/gemms.py`: its matrix products by layout).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class PerCallRecorder(TorchDispatchMode):
    """Counts, while active and a call is open (`open`...`close`), the ATen operations dispatched,
    each under the name `key(func, args)` gives it (None: not counted)."""

    def __init__(self, key: Callable[[object, tuple], Hashable | None]) -> None:
        super().__init__()
        self.key = key
        self.calls: list[Counter] = []
        self.current: Counter | None = None

    def open(self, *_) -> None:
        self.current = Counter()
        self.calls.append(self.current)

    def close(self, *_) -> None:
        self.current = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.current is not None:
            name = self.key(func, args)
            if name is not None:
                self.current[name] += 1
        return func(*args, **(kwargs or {}))


def dispatched_per_call(
    transformer: torch.nn.Module, run: Callable[[], object], key: Callable[[object, tuple], Hashable | None]
) -> list[Counter]:
    """What each call of `transformer` during `run()` dispatches, counted by `key`, in call order."""
    recorder = PerCallRecorder(key)
    handles = [
        transformer.register_forward_pre_hook(recorder.open),
        transformer.register_forward_hook(recorder.close),
    ]
    try:
        with recorder:
            run()
    finally:
        for handle in handles:
            handle.remove()
    return recorder.calls


def ops_per_call(transformer: torch.nn.Module, run: Callable[[], object]) -> list[int]:
    """The ATen operations of each call of `transformer` during `run()`, in call order."""
    return [call["op"] for call in dispatched_per_call(transformer, run, lambda func, args: "op")]
