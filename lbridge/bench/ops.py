"""How many ATen operations each transformer call dispatches: the host's share of a call's cost.

Eager PyTorch spends host time on every dispatched operation (Python, the dispatcher and, on CUDA,
a kernel launch), whatever its size. A CACHED call whose GPU work is small is bound by that host
time once the operations outnumber what the GPU can hide: the count is the device-free measure of
it (views included, which launch nothing but still cost dispatch).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class OpCounter(TorchDispatchMode):
    """Counts the ATen operations dispatched while active."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def ops_per_call(transformer: torch.nn.Module, run: Callable[[], object]) -> list[int]:
    """The ATen operations of each call of `transformer` during `run()`, in call order."""
    counter, counts, start = OpCounter(), [], [0]

    def enter(*_) -> None:
        start[0] = counter.count

    def leave(*_) -> None:
        counts.append(counter.count - start[0])

    handles = [transformer.register_forward_pre_hook(enter), transformer.register_forward_hook(leave)]
    try:
        with counter:
            run()
    finally:
        for handle in handles:
            handle.remove()
    return counts
