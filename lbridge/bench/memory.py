"""Memory a method costs beyond the model: what its hooks keep between calls, and what a run holds at most.

`cache_bytes`: every tensor the hooks keep between calls (the bench takes the most of it after any
call of a run, `cache_watched`: a method may drop its cache when the sample ends). That is the
method's cache; with `modulation=batched`, the sample's step tables (the embedding and every
modulation's output for all steps: ~100 MB in bf16 at FLUX.1-dev's 50 steps), which full compute
holds too when it runs batched; and the rotary embedding kept per CFG branch (its output only: the
inputs it keeps a reference to are the pipeline's; FLUX.1-dev at 1024px: 4.7 MB).

`run_peak_bytes`: the most bytes the tensors a run allocates hold at once (activations, the cache
it builds, its outputs), beyond the weights and inputs live when it starts. The same quantity on
both devices: CUDA's allocator keeps the counter; the CPU's keeps none, so the profiler's
allocation events are summed instead (one untimed run: the profiler costs host time per op).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from collections.abc import Set as AbstractSet
from contextlib import contextmanager
from typing import Any

import torch
from torch._C._profiler import _EventType, _ProfilerEvent
from torch.profiler import ProfilerActivity, profile

from lbridge.api import Accelerator
from lbridge.runtime.context import CacheRuntime
from lbridge.runtime.hooks import PREFIX, ModelHook, register, remove_all
from lbridge.runtime.schedule import Schedule

#: Reached from hooks but not cache: model weights (bridge copies share them), the runtime, callables.
_SKIP = (torch.nn.Module, CacheRuntime, Schedule, type, torch.dtype, torch.device)
_WATCH = PREFIX + "bench.cache_watch"


def cache_bytes(acc: Accelerator) -> int:
    """Bytes of the distinct tensor storages reachable from the accelerator's hooks (weights excluded)."""
    storages: dict[int, int] = {}
    seen: set[int] = set()
    rotary_hooks = acc.rotary.hooks if acc.rotary is not None else []
    rotary = [entry.output for hook in rotary_hooks for entry in hook.entries.values()]
    # `batched_modulation`: None, or its step embedding hook and each modulation's tables.
    stack: list[Any] = [*acc.method.hooks(), acc.batched_modulation, *rotary]
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
        elif isinstance(obj, Sequence | AbstractSet) and not isinstance(obj, str | bytes):
            stack.extend(obj)  # lists, tuples, sets, and deques too (L2P's history of FULL outputs)
        elif hasattr(obj, "__dict__") and not isinstance(obj, str):
            stack.extend(v for k, v in vars(obj).items() if k != "fn_ref")
    return sum(storages.values())


class CacheWatch(ModelHook):
    """Outermost on the transformer while registered: the most `cache_bytes` held after any call.

    A cache is at its largest between calls, not necessarily after the run: diffusers' MagCache
    drops its residual when the sample's last step is done."""

    def __init__(self, acc: Accelerator) -> None:
        super().__init__()
        self.acc, self.most = acc, 0

    def post_forward(self, module: torch.nn.Module, output):
        self.most = max(self.most, cache_bytes(self.acc))
        return output


@contextmanager
def cache_watched(acc: Accelerator) -> Iterator[CacheWatch]:
    """Watch the cache after every transformer call made inside (`CacheWatch`)."""
    watch = CacheWatch(acc)
    register(acc.transformer, watch, _WATCH)
    try:
        yield watch
    finally:
        remove_all(acc.transformer, [_WATCH])


def run_peak_bytes(run: Callable[[], object], device: torch.device) -> int:
    """Calls `run` once; the most bytes its own allocations held at once (see the module docstring)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        run()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    # Kineto writes two stderr lines at every profiler start and stop: quiet, unless the user set a level.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch 2.11's note on profiler cycles
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            run()
    events = _allocations(prof.profiler.kineto_results.experimental_event_tree())
    live: dict[int, int] = {}  # pointer -> bytes, of blocks allocated during the run
    held = peak = 0
    for event in sorted(events, key=lambda e: e.start_time_ns):
        size, ptr = event.extra_fields.alloc_size, event.extra_fields.ptr
        if size > 0:
            live[ptr] = size
            held += size
            peak = max(peak, held)
        elif ptr in live:  # a block from before the run: what it freed was never counted
            held -= live.pop(ptr)
    return peak


def _allocations(events: list[_ProfilerEvent]) -> Iterator[_ProfilerEvent]:
    """The allocation and free events among `events` and everything nested in them."""
    stack = list(events)
    while stack:
        event = stack.pop()
        if event.tag == _EventType.Allocation:
            yield event
        stack.extend(event.children)
