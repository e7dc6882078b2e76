"""Regional torch.compile under lbridge's hooks, and the recompile / graph-break counts.

The compiled regions are the modules whose forward lbridge's hooks call as the *original* forward:
every transformer block for block-level methods, the attention / MLP sites for site-level ones
(ToCa, `site=attn_mlp`), plus LearniBridge's bridge. Each region's `forward` is replaced by its
compiled version *before* the hooks are registered, so the hooks wrap compiled code and their Python
(the schedule lookup, the cache) never enters a graph: the step index is not a guard, and a CACHED
step never recompiles. Compiling a whole block whose submodules carry hooks would trace the hooks and
guard on the step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch._dynamo.utils import counters

from lbridge.api import Accelerator
from lbridge.runtime.hooks import PREFIX


def dynamo_counts() -> tuple[int, int]:
    """(graphs compiled, graph breaks) so far in this process."""
    return int(counters["stats"]["unique_graphs"]), int(sum(counters["graph_break"].values()))


@dataclass
class CompileStats:
    """Graphs compiled for one method: in its warm-up runs, and (recompiles) in its timed runs."""

    enabled: bool
    start: tuple[int, int] = (0, 0)
    warm: tuple[int, int] = (0, 0)
    end: tuple[int, int] = (0, 0)
    recompiles: int = 0

    def mark_warm(self, warmup: Callable[[], Any]) -> None:
        warmup()
        self.warm = dynamo_counts()

    def mark_timed(self) -> None:
        self.end = dynamo_counts()
        self.recompiles += self.end[0] - self.warm[0]

    def row(self) -> dict[str, int | None]:
        if not self.enabled:
            return {"graphs": None, "recompiles": None, "graph_breaks": None}
        return {"graphs": self.end[0] - self.start[0], "recompiles": self.recompiles,
                "graph_breaks": self.end[1] - self.start[1]}  # fmt: skip


def hooked_modules(root: torch.nn.Module) -> list[torch.nn.Module]:
    """Modules under `root` carrying an lbridge hook (the context hook on the root excluded)."""
    found = []
    for module in root.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if module is not root and registry is not None and any(n.startswith(PREFIX) for n in registry.hooks):
            found.append(module)
    return found


def regions(acc: Accelerator) -> list[torch.nn.Module]:
    """Blocks, or the hooked sites inside them when a method hooks below block level; plus bridges."""
    blocks = acc.adapter.blocks(acc.transformer)
    acc.attach()
    try:
        hooked = hooked_modules(acc.transformer)
    finally:
        acc.remove()
    block_ids = {id(b) for b in blocks}
    inner = [m for m in hooked if id(m) not in block_ids]
    found = inner if inner else list(blocks)
    extra = getattr(acc.method, "cached_step_modules", list)()  # LearniBridge's bridges
    return found + extra


@contextmanager
def compiled_regions(acc: Accelerator, enabled: bool, **options: Any) -> Iterator[CompileStats]:
    """Compile `regions(acc)` for the duration (hooks must be attached inside, and are removed on exit)."""
    stats = CompileStats(enabled, start=dynamo_counts())
    if not enabled:
        yield stats
        return
    modules = regions(acc)
    for module in modules:
        module.forward = torch.compile(module.forward, **options)
    try:
        yield stats
    finally:
        acc.remove()
        for module in modules:
            module.__dict__.pop("forward", None)
