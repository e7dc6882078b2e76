"""Where the denoising loop is, for every transformer call, as lbridge itself determines it.

We reuse diffusers' `CacheContext` record (branch name, step index, number of steps, timestep,
sigma). Pipelines only fill in the branch name (`transformer.cache_context("cond")`); lbridge fills
in the rest from a *clock* -- by default the pipeline's scheduler -- instead of counting calls, so
CFG branches, extra calls or an interrupted sample cannot shift the step index.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.hooks.hooks import CacheContext

from lbridge.errors import LbridgeError
from lbridge.runtime.schedule import Schedule

DEFAULT_BRANCH = "default"

__all__ = ["CacheContext", "CacheRuntime", "ManualClock", "SchedulerClock"]


class SchedulerClock:
    """Reads the step from a diffusers scheduler, which the pipeline advances after every step."""

    def __init__(self, scheduler) -> None:
        self.scheduler = scheduler

    def context(self, branch: str, timestep: torch.Tensor | None = None) -> CacheContext:
        timesteps = self.scheduler.timesteps
        if timesteps is None or len(timesteps) == 0:
            raise LbridgeError(
                "the scheduler has no timesteps yet: call lbridge hooks from inside a pipeline"
            )
        if hasattr(self.scheduler, "step_index"):
            # `step_index` is None until the first `scheduler.step()`; the pipelines set begin_index=0.
            step = self.scheduler.step_index
            if step is None:
                step = getattr(self.scheduler, "begin_index", None) or 0
        else:  # DDPM/DDIM keep no step counter: the call's timestep is the clock
            step = _index_of(timesteps, timestep, type(self.scheduler).__name__)
        sigmas = getattr(self.scheduler, "sigmas", None)
        sigma = sigmas[step] if sigmas is not None else None
        if isinstance(sigma, torch.Tensor) and sigma.device.type == "cpu":
            sigma = float(sigma)  # never `float()` a GPU tensor here: a host sync on every call
        return CacheContext(branch, step, len(timesteps), timesteps[step], sigma)


def _index_of(timesteps: torch.Tensor, timestep: torch.Tensor | None, scheduler: str) -> int:
    """The position of a transformer call's timestep in the schedule (one host sync per call)."""
    if timestep is None:
        raise LbridgeError(
            f"{scheduler} has no step_index and the transformer call passed no `timestep`: "
            "lbridge cannot tell the step"
        )
    value = torch.as_tensor(timestep).flatten()[0].to(timesteps.device, timesteps.dtype)
    matches = (timesteps == value).nonzero()
    if len(matches) == 0:
        raise LbridgeError(f"timestep {float(value)} is not in the {scheduler} schedule")
    return int(matches[0])


class ManualClock:
    """A clock set by hand: cost measurement and tests drive single transformer calls with it."""

    def __init__(self, num_steps: int, step: int = 0) -> None:
        self.num_steps, self.step = num_steps, step

    def context(self, branch: str, timestep: torch.Tensor | None = None) -> CacheContext:
        return CacheContext(branch, self.step, self.num_steps, None, None)


@dataclass
class CacheRuntime:
    """State shared by lbridge's hooks on one transformer: the clock, the schedule, the context.

    A static method's calls are FULL or CACHED as the schedule says. An adaptive method (TeaCache,
    FirstBlockCache, MagCache) marks steps as *candidates* in the schedule (CACHED there) and gives
    its verdict on each candidate call with `decide` once its probe has run, before the blocks read
    `is_full`. The counters and `realised` (what each call really did) account for both.
    """

    clock: SchedulerClock | ManualClock
    schedule: Schedule
    context: CacheContext | None = None
    full_calls: int = 0
    cached_calls: int = 0
    #: (branch, step) -> whether that call ran FULL, for the calls since the last `reset_counts`.
    realised: dict[tuple[str, int], bool] = field(default_factory=dict)
    #: An adaptive method's verdict on the current call (None: the schedule decides).
    decision: bool | None = None

    #: The current transformer call's `timestep` argument, set by the context hook before `enter_call`:
    #: the clock of a scheduler without `step_index` reads the step from it.
    call_timestep: torch.Tensor | None = None
    #: The current transformer call's keyword arguments (the rotary cache reads what fixes its output).
    call_arguments: dict[str, Any] = field(default_factory=dict)

    def enter_call(self, branch: str | None) -> CacheContext:
        context = self.clock.context(branch or DEFAULT_BRANCH, self.call_timestep)
        if context.num_inference_steps != len(self.schedule):
            raise LbridgeError(
                f"the pipeline runs {context.num_inference_steps} steps but the lbridge schedule has "
                f"{len(self.schedule)}: pass the same num_inference_steps to lbridge.accelerate"
            )
        self.context, self.decision = context, None
        full = self.is_full
        self.full_calls += full
        self.cached_calls += not full
        self.realised[(self.branch, self.step)] = full
        return context

    def decide(self, full: bool) -> None:
        """An adaptive method's verdict on the current call; steps the schedule marks FULL stay FULL."""
        full = full or self.schedule.is_full(self.step)
        if full != self.is_full:  # move the call to the other counter
            self.full_calls += 1 if full else -1
            self.cached_calls -= 1 if full else -1
        self.decision = full
        self.realised[(self.branch, self.step)] = full

    def reset_counts(self) -> None:
        self.full_calls = self.cached_calls = 0
        self.realised.clear()

    def realised_schedule(self) -> str:
        """'F'/'c' per step as the calls really ran (a step is F if any of its CFG branches was)."""
        steps = [False] * len(self.schedule)
        for (_, step), full in self.realised.items():
            steps[step] = steps[step] or full
        return "".join("F" if full else "c" for full in steps)

    @property
    def is_full(self) -> bool:
        if self.context is None:
            return True
        if self.decision is not None:
            return self.decision
        return self.schedule.is_full(self.context.step_index)

    @property
    def branch(self) -> str:
        return self.context.name if self.context is not None else DEFAULT_BRANCH

    @property
    def step(self) -> int:
        return self.context.step_index if self.context is not None else 0
