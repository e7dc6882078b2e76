"""Where a call's time goes, module by module, and each module's FLOPs: what a CACHED call pays
beyond its FLOPs share, attributed.

A call's FLOPs share is one number for the whole call; the breakdown splits it. Modules are grouped
across blocks by their path with the block index left out (`transformer_blocks.*.ff`: the `ff` of
every double block), down to a block's children. Each group gets, per call, the seconds spent inside
its modules and the FLOPs they run. A block's time beyond its children's is its own code, the
`(block code)` row: modulation gates, residual adds, concatenations, Python (FLOPs count none of it),
and whatever a method runs in the block's place (LearniBridge's bridge, a copy of the block).
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pandas as pd
import torch
from torch.utils.flop_counter import FlopCounterMode

from lbridge.bench.device import synchronised_clock
from lbridge.runtime.cost import FLOP_FORMULAS

BLOCK_CODE = "(block code)"
CALL_CODE = "(transformer code)"
Stats = dict[str, tuple[float, float]]  # group -> (seconds, FLOPs)


def tracked_modules(transformer: torch.nn.Module) -> dict[str, list[torch.nn.Module]]:
    """Group -> its modules: the transformer's children (`proj_out`), the blocks of each block list
    (`transformer_blocks.*`: every member of the `ModuleList`) and the blocks' children
    (`transformer_blocks.*.ff`)."""
    groups: dict[str, list[torch.nn.Module]] = defaultdict(list)
    for name, child in transformer.named_children():
        if not isinstance(child, torch.nn.ModuleList):
            groups[name].append(child)
            continue
        for block in child:
            groups[f"{name}.*"].append(block)
            for sub, module in block.named_children():
                groups[f"{name}.*.{sub}"].append(module)
    return groups


class ModuleRecorder:
    """Per transformer call: seconds and FLOPs inside every tracked module, summed by group.

    Seconds: CPU time of this process on CPU; on CUDA, wall time synchronised at every module
    boundary (a diagnostic: the syncs themselves slow the call). FLOPs: counted while `flops` is an
    active `FlopCounterMode`, else 0. The recorder's own hooks cost host time in every call, some
    microseconds a module: at FLUX.1-dev's depth and a toy width, several milliseconds a call.
    """

    def __init__(self, transformer: torch.nn.Module, cuda: bool) -> None:
        self.now = synchronised_clock(cuda)
        self.flops: FlopCounterMode | None = None
        self.calls: list[dict[str, list[float]]] = []  # per call: group -> [seconds, flops]
        self.handles = []
        self.groups = tracked_modules(transformer)
        self._watch(transformer, "")
        for group, modules in self.groups.items():
            for module in modules:
                self._watch(module, group)

    def _now(self) -> tuple[float, int]:
        return self.now(), self.flops.get_total_flops() if self.flops is not None else 0

    def _watch(self, module: torch.nn.Module, group: str) -> None:
        started: list[tuple[float, int]] = []

        def enter(*_) -> None:
            if not group:
                self.calls.append(defaultdict(lambda: [0.0, 0]))
            started.append(self._now())

        def leave(*_) -> None:
            (t0, f0), (t1, f1) = started.pop(), self._now()
            totals = self.calls[-1][group or CALL_CODE]
            totals[0] += t1 - t0
            totals[1] += f1 - f0

        self.handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def per_call(self, call: dict[str, list[float]]) -> dict[str, tuple[float, int]]:
        """Exclusive seconds and FLOPs per group: a block's own code and the transformer's split out."""
        out = {group: tuple(call[group]) for group in self.groups if group in call}
        for group in [g for g in self.groups if g.endswith(".*")]:
            if group in call:
                children = [g for g in out if g.startswith(group + ".")]
                out[f"{group} {BLOCK_CODE}"] = _minus(call[group], [out[c] for c in children])
                del out[group]
        out[CALL_CODE] = _minus(call[CALL_CODE], list(out.values()))  # the rest partition the call
        return out


def _minus(total: list[float], parts: list[tuple[float, int]]) -> tuple[float, int]:
    return total[0] - sum(p[0] for p in parts), int(total[1] - sum(p[1] for p in parts))


@contextmanager
def recorded(transformer: torch.nn.Module, cuda: bool, count_flops: bool = False) -> Iterator[ModuleRecorder]:
    """Record every call of `transformer` in the block; with `count_flops`, FLOPs as well."""
    recorder = ModuleRecorder(transformer, cuda)
    try:
        if count_flops:
            with FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS) as recorder.flops:
                yield recorder
        else:
            yield recorder
    finally:
        recorder.remove()


def medians(calls: list[dict[str, tuple[float, int]]]) -> Stats:
    """Group -> (median seconds, median FLOPs) over calls."""
    groups = list(dict.fromkeys(g for call in calls for g in call))
    return {
        g: (
            statistics.median(c.get(g, (0.0, 0))[0] for c in calls),
            statistics.median(c.get(g, (0.0, 0))[1] for c in calls),
        )
        for g in groups
    }


def breakdown_table(full: Stats, cached: Stats) -> pd.DataFrame:
    """One row per group: FULL and CACHED time and FLOPs; `share_ms`, the group's FULL time scaled by
    its own FLOPs ratio (0 where its FULL call counts no FLOPs); `excess_ms`, what the CACHED call
    spends beyond it. Sorted by excess, a total row last."""
    rows = []
    for group in dict.fromkeys([*full, *cached]):
        full_s, full_flops = full.get(group, (0.0, 0))
        cached_s, cached_flops = cached.get(group, (0.0, 0))
        share = full_s * cached_flops / full_flops if full_flops else 0.0
        rows.append({"module": group, "full_ms": 1000 * full_s, "cached_ms": 1000 * cached_s,
                     "full_gflop": full_flops / 1e9, "cached_gflop": cached_flops / 1e9,
                     "share_ms": 1000 * share, "excess_ms": 1000 * (cached_s - share)})  # fmt: skip
    table = pd.DataFrame(rows).sort_values("excess_ms", ascending=False, kind="stable")
    total = table.drop(columns="module").sum().to_dict()
    return pd.concat([table, pd.DataFrame([{"module": "total", **total}])], ignore_index=True)


def module_breakdown(
    transformer: torch.nn.Module, cuda: bool, full_run: Callable[[], None], cached_run: Callable[[], None],
    first_cached: int, runs: int,
) -> pd.DataFrame:  # fmt: skip
    """Breakdown of the CACHED calls of `cached_run` (from call `first_cached`) against the FULL calls
    of `full_run`: times are medians over `runs` timed runs of each, alternating; FLOPs come from one
    more run of each, counted and not timed."""
    full_calls, cached_calls = [], []
    for run in range(runs + 1):  # the first pair warms up
        with recorded(transformer, cuda) as full:
            full_run()
        with recorded(transformer, cuda) as cached:
            cached_run()
        if run:
            full_calls += [full.per_call(c) for c in full.calls]
            cached_calls += [cached.per_call(c) for c in cached.calls[first_cached:]]
    with recorded(transformer, cuda, count_flops=True) as full:
        full_run()
    with recorded(transformer, cuda, count_flops=True) as cached:
        cached_run()
    full_flops = medians([full.per_call(c) for c in full.calls])
    cached_flops = medians([cached.per_call(c) for c in cached.calls[first_cached:]])
    timed_full, timed_cached = medians(full_calls), medians(cached_calls)
    return breakdown_table(
        {g: (s, full_flops.get(g, (0, 0))[1]) for g, (s, _) in timed_full.items()},
        {g: (s, cached_flops.get(g, (0, 0))[1]) for g, (s, _) in timed_cached.items()},
    )
