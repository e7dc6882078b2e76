"""Which steps are FULL (run every block) and which are CACHED, and the solver from a FLOPs ratio."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from lbridge.errors import LbridgeError

SPACINGS = ("even", "interval")


@dataclass(frozen=True)
class Schedule:
    full: tuple[bool, ...]

    def __post_init__(self) -> None:
        if not self.full or not self.full[0]:
            raise ValueError("a schedule needs at least one step and its first step FULL")

    def __len__(self) -> int:
        return len(self.full)

    def is_full(self, step: int) -> bool:
        return self.full[step]

    @property
    def num_full(self) -> int:
        return sum(self.full)

    @property
    def num_cached(self) -> int:
        return len(self.full) - self.num_full

    def last_full(self, step: int) -> int:
        """The most recent FULL step at or before `step` (a lookup: asked at every CACHED call)."""
        return self._last_full[step]

    def full_history(self, step: int, count: int) -> list[int]:
        """The last `count` FULL steps at or before `step`, most recent first (what forecasts read)."""
        return [f for f in range(step, -1, -1) if self.full[f]][:count]

    @functools.cached_property
    def _last_full(self) -> tuple[int, ...]:
        table, last = [], 0
        for step, full in enumerate(self.full):
            last = step if full else last
            table.append(last)
        return tuple(table)

    def flops_ratio(self, full_flops: float, cached_flops: float) -> float:
        return len(self) * full_flops / (self.num_full * full_flops + self.num_cached * cached_flops)

    def __str__(self) -> str:
        return "".join("F" if f else "c" for f in self.full)

    @classmethod
    def parse(cls, text: str) -> Schedule:
        return cls(tuple(ch == "F" for ch in text))

    @classmethod
    def all_full(cls, num_steps: int) -> Schedule:
        return cls((True,) * num_steps)

    @classmethod
    def with_full_count(cls, num_steps: int, num_full: int, warmup: int) -> Schedule:
        """`warmup` leading FULL steps; the other FULL steps at even gaps after the last warmup step."""
        rest = num_full - warmup
        full = [s < warmup for s in range(num_steps)]
        # Spread rest+1 equal gaps over [warmup-1, num_steps]: the last warmup step counts as a
        # FULL step, so no two FULL steps bunch up right after the warmup.
        span = num_steps - warmup + 1
        for i in range(max(rest, 0)):
            full[warmup - 1 + (i + 1) * span // (rest + 1)] = True
        return cls(tuple(full))

    @classmethod
    def with_interval(cls, num_steps: int, interval: int, warmup: int) -> Schedule:
        """`warmup` leading FULL steps, then one FULL step every `interval` steps (FORA's N)."""
        if interval < 1:
            raise LbridgeError(f"schedule.interval={interval} must be >= 1")
        return cls(tuple(s < warmup or (s - warmup) % interval == 0 for s in range(num_steps)))


def solve(
    num_steps: int,
    full_flops: float,
    cached_flops: float,
    ratio: float,
    warmup: int = 1,
    spacing: str = "even",
) -> Schedule:
    """The schedule with the fewest cached steps whose FLOPs ratio full/accelerated is >= `ratio`."""
    if spacing not in SPACINGS:
        raise LbridgeError(f"unknown schedule spacing '{spacing}' (accepted: {', '.join(SPACINGS)})")
    if not 1 <= warmup <= num_steps:
        raise LbridgeError(f"schedule.warmup={warmup} must be between 1 and num_inference_steps={num_steps}")
    if spacing == "even":
        candidates = (
            Schedule.with_full_count(num_steps, n, warmup) for n in range(num_steps, warmup - 1, -1)
        )
    else:
        candidates = (Schedule.with_interval(num_steps, n, warmup) for n in range(1, num_steps + 1))
    best = None
    for schedule in candidates:
        if schedule.flops_ratio(full_flops, cached_flops) >= ratio - 1e-9:
            return schedule
        best = schedule
    reachable = best.flops_ratio(full_flops, cached_flops)
    raise LbridgeError(
        f"ratio={ratio:g} is above the maximum reachable {reachable:.2f} for {num_steps} steps with "
        f"warmup={warmup} (cached step costs {cached_flops / full_flops:.1%} of a full step); "
        f"choose ratio <= {reachable:.2f}"
    )
