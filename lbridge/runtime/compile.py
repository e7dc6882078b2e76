"""Regional torch.compile under lbridge's hooks, and the recompile / graph-break counts.

The compiled regions are the modules whose forward lbridge's hooks call as the *original* forward:
every transformer block for block-level methods, the attention / MLP sites for site-level ones
(ToCa, `site=attn_mlp`), plus the modules a method runs in a block's place (`step_modules`:
LearniBridge's bridge at CACHED steps; ToCa's one-forward blocks, `BlockForward`, at every step,
whose sites then run inside them and are not regions of their own). Each region's `forward`
is replaced by its compiled version *before* the hooks are registered, so the hooks wrap compiled
code and their Python (the schedule lookup, the cache) never enters a graph: the step index is not
a guard, and a CACHED step never recompiles. Compiling a whole block whose submodules carry hooks
would trace the hooks and guard on the step (and, under torch 2.11, on each hooked module's own
`forward` object: a graph per block). What must run inside a block's graph is a module's class
instead (`modulation=batched`: lbridge/runtime/modulation.py).

Used by `lbridge sample` (`runtime.compile=true`: both of its runs) and by the speed scripts.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch._dynamo.utils import counters

from lbridge.runtime.hooks import PREFIX

if TYPE_CHECKING:  # the Accelerator installs what this module compiles around
    from lbridge.api import Accelerator


def dynamo_counts() -> tuple[int, int]:
    """(graphs compiled, graph breaks) so far in this process."""
    return int(counters["stats"]["unique_graphs"]), int(sum(counters["graph_break"].values()))


@dataclass
class CompileStats:
    """Graphs compiled for one method: in its warm-up runs, and (recompiles) in its timed runs."""

    enabled: bool
    regions: int = 0  # modules whose forward is compiled
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
            return {"regions": None, "graphs": None, "recompiles": None, "graph_breaks": None}
        return {"regions": self.regions, "graphs": self.end[0] - self.start[0], "recompiles": self.recompiles,
                "graph_breaks": self.end[1] - self.start[1]}  # fmt: skip


def hooked_modules(root: torch.nn.Module) -> list[torch.nn.Module]:
    """Modules under `root` carrying an lbridge hook (the context hook on the root excluded)."""
    found = []
    for module in root.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if module is not root and registry is not None and any(n.startswith(PREFIX) for n in registry.hooks):
            found.append(module)
    return found


class BlockForward(torch.nn.Module):
    """A forward a method runs a block with instead of the block's own, as a module of its own: a
    region. A method builds them for every call of the block it gives them to (ToCa: one for its
    FULL calls, one for its CACHED ones), so the block's hooked sites never run outside them."""

    def __init__(self, block: torch.nn.Module, forward: Callable[..., Any]) -> None:
        super().__init__()
        self.block, self.run = block, forward

    def forward(self, step: Any, *args, **kwargs):
        return self.run(self.block, step, *args, **kwargs)


def regions(acc: Accelerator) -> list[torch.nn.Module]:
    """Blocks, or the hooked sites inside them when a method hooks below block level, except those
    of blocks that run as `BlockForward`s; plus the modules a method runs in a block's place."""
    blocks = acc.adapter.blocks(acc.transformer)
    acc.attach()
    try:
        hooked = hooked_modules(acc.transformer)
    finally:
        acc.remove()
    extra = getattr(acc.method, "step_modules", list)()  # bridges, one-forward blocks
    # Only a hook *inside* a block makes a method site-level. Hooks outside the blocks (the rotary
    # embedding's, always on) are no reason to leave the blocks eager, and their module is not
    # worth a graph: it runs once per sample.
    inside = {id(m): block for block in blocks for m in block.modules() if m is not block}
    inner = [m for m in hooked if id(m) in inside]
    if not inner:
        return list(blocks) + extra
    run_whole = {id(m.block) for m in extra if isinstance(m, BlockForward)}
    return [m for m in inner if id(inside[id(m)]) not in run_whole] + extra


def compiled_forward(module: torch.nn.Module, **options: Any) -> Callable[..., Any]:
    """The region's forward, compiled. A `BlockForward`'s is its `run` function compiled, called
    with its block: dynamo keeps graphs per code object (8 at most, every backend's together), and
    a FLUX block's FULL and CACHED forwards need 5-6 (a single block's first input has another
    stride); under `BlockForward.forward`, which all of them share, they would not fit."""
    if isinstance(module, BlockForward):
        return functools.partial(torch.compile(module.run, **options), module.block)
    return torch.compile(module.forward, **options)


class CompiledRegions:
    """One accelerator with its compiled regions, swapped in only while it is installed.

    Paired timing alternates full compute and a method run by run, and the two compile different
    regions (whole blocks; ToCa's sites inside them): each run installs its own compiled forwards,
    then its hooks, and takes both away after. The compiled callables live as long as this object,
    so re-installing re-enters the graphs dynamo already built (a swap that made dynamo build again
    would show as `recompiles`).
    """

    def __init__(self, acc: Accelerator, enabled: bool, **options: Any) -> None:
        self.acc = acc
        self.stats = CompileStats(enabled, start=dynamo_counts())
        modules = regions(acc) if enabled else []
        self.compiled = [(module, compiled_forward(module, **options)) for module in modules]
        self.stats.regions = len(self.compiled)

    @contextmanager
    def installed(self) -> Iterator[Accelerator]:
        for module, forward in self.compiled:  # before the hooks, so the hooks wrap compiled code
            module.forward = forward
        self.acc.attach()
        try:
            yield self.acc
        finally:
            self.acc.remove()
            for module, _ in self.compiled:
                module.__dict__.pop("forward", None)
