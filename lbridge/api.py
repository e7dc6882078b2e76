"""`lbridge.accelerate(pipe, method, ratio)`: the one-call Python API.

    pipe = FluxPipeline.from_pretrained(...)
    acc = lbridge.accelerate(pipe, "fora", ratio=3, prompt="a cat", num_inference_steps=50)
    image = pipe("a cat", num_inference_steps=50).images[0]
    print(acc.summary())
    acc.remove()

The keyword arguments after `ratio` are one pipeline call: lbridge starts it, captures the first
transformer call (the real shapes) and stops it there, then counts FLOPs of a FULL and a CACHED step
on those inputs and solves the schedule that reaches the ratio.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DiffusionPipeline
from diffusers.hooks import ModelHook

from lbridge.errors import LbridgeError
from lbridge.methods.base import CacheMethod, load_method
from lbridge.models.base import ModelAdapter, adapter_for
from lbridge.runtime.context import CacheRuntime, ManualClock, SchedulerClock
from lbridge.runtime.cost import StepCost, count_flops
from lbridge.runtime.hooks import CONTEXT_HOOK, StepContextHook, register, remove_all
from lbridge.runtime.modulation import StepBatchedModulation, check_modulation
from lbridge.runtime.rotary import RotaryCache
from lbridge.runtime.schedule import Schedule, solve


@dataclass
class CapturedCall:
    args: tuple
    kwargs: dict[str, Any]
    num_steps: int


class _Captured(Exception):  # noqa: N818 -- control flow, never reaches a user
    pass


class _CaptureHook(ModelHook):
    def __init__(self, scheduler) -> None:
        super().__init__()
        self.scheduler = scheduler

    def pre_forward(self, module, *args, **kwargs):
        raise _Captured(CapturedCall(args, kwargs, len(self.scheduler.timesteps)))


def capture_transformer_call(
    pipe: DiffusionPipeline, transformer: torch.nn.Module, **call: Any
) -> CapturedCall:
    """Run `pipe(**call)` only up to its first transformer call and return that call's inputs."""
    name = "lbridge.capture"
    register(transformer, _CaptureHook(pipe.scheduler), name)
    try:
        pipe(**call)
    except _Captured as done:
        return done.args[0]
    finally:
        remove_all(transformer, [name])
    raise LbridgeError("the pipeline call never called its transformer")


class Accelerator:
    """A method attached to one pipeline's transformer with a solved schedule.

    `modulation="batched"` also computes every block's AdaLN modulation once per sample for all its
    steps (lbridge/runtime/modulation.py; FLUX), whatever the method: the weights those one-row
    matmuls stream are read once per sample instead of once per step.
    """

    def __init__(
        self,
        pipe: DiffusionPipeline,
        method: CacheMethod,
        adapter: ModelAdapter,
        modulation: str = "per_step",
    ) -> None:
        self.pipe, self.method, self.adapter = pipe, method, adapter
        self.modulation = check_modulation(modulation)
        self.batched_modulation: StepBatchedModulation | None = None
        self.rotary: RotaryCache | None = None  # the rotary embedding once per sample (while attached)
        self.transformer = adapter.transformer(pipe)
        self.runtime: CacheRuntime | None = None
        self.cost: StepCost | None = None
        self.attached = False

    # -- planning ----------------------------------------------------------------------------
    def plan(
        self,
        ratio: float,
        call: dict[str, Any],
        warmup: int = 1,
        spacing: str = "even",
        interval: int | None = None,
    ) -> Schedule:
        """Capture `pipe(**call)`'s first transformer call, count FULL/CACHED FLOPs, solve the schedule."""
        captured = capture_transformer_call(self.pipe, self.transformer, **call)
        steps = captured.num_steps
        self.runtime = CacheRuntime(ManualClock(steps), Schedule.all_full(steps))
        self.attach()
        try:
            self.cost = self._measure(captured)
        finally:
            self.remove()
        if not self.method.accelerates:
            schedule = Schedule.all_full(steps)
        elif getattr(self.method, "adaptive", False):
            schedule = self._candidates(steps, float(ratio), warmup, interval)
        elif interval is not None:
            schedule = Schedule.with_interval(steps, int(interval), warmup)
        else:
            schedule = solve(steps, self.cost.full, self.cost.cached, float(ratio), warmup, spacing)
        self.runtime = CacheRuntime(SchedulerClock(self.pipe.scheduler), schedule)
        return schedule

    def _candidates(self, steps: int, ratio: float, warmup: int, interval: int | None) -> Schedule:
        """An adaptive method's candidate steps; a ratio above what skipping them all gives stops here."""
        if interval is not None:
            raise LbridgeError(
                f"schedule.interval={interval} fixes a static schedule; {self.method.name} decides its "
                "steps at run time (set schedule.interval=null)"
            )
        candidates = self.method.candidates(steps, warmup)
        bound = candidates.flops_ratio(self.cost.full, self.cost.cached)
        if ratio > bound + 1e-9:
            raise LbridgeError(
                f"ratio={ratio:g} is above the maximum reachable {bound:.2f} for {self.method.name} with "
                f"{steps} steps and warmup={warmup} (every candidate step skipped); "
                f"choose ratio <= {bound:.2f}"
            )
        return candidates

    def _measure(self, captured: CapturedCall) -> StepCost:
        clock = self.runtime.clock

        def call() -> None:
            self.transformer(*captured.args, **captured.kwargs)

        clock.step = 0
        full = count_flops(call)
        if not self.method.accelerates or captured.num_steps < 2:
            return StepCost(full, full)
        # Step 0 is FULL (fills the caches), step 1 is CACHED: count the CACHED call alone.
        self.runtime.schedule = Schedule((True, False) + (True,) * (captured.num_steps - 2))
        clock.step = 0
        with torch.no_grad():
            call()
        clock.step = 1
        if getattr(self.method, "adaptive", False):  # a candidate step, skipped whatever it measures
            with self.method.thresholded(math.inf):
                cached = count_flops(call)
        else:
            cached = count_flops(call)
        self.method.reset()
        return StepCost(full, cached)

    # -- hooks -------------------------------------------------------------------------------
    def attach(self) -> Accelerator:
        if self.runtime is None:
            raise LbridgeError("plan() the schedule before attaching")
        if not self.attached:
            self.attached = True  # so that `remove` takes back what a refusal below left attached
            try:
                self.method.attach(self.transformer, self.adapter, self.runtime)
                if self.modulation == "batched":
                    self.batched_modulation = StepBatchedModulation(self.runtime)
                    self.batched_modulation.attach(self.transformer, self.adapter)
                self.rotary = RotaryCache(self.runtime)  # exact, so always on
                self.rotary.attach(self.transformer, self.adapter)
                # Registered last, so it is the outermost hook: the context is set before anything runs.
                register(self.transformer, StepContextHook(self.runtime), CONTEXT_HOOK)
            except BaseException:
                self.remove()
                raise
        return self

    def remove(self) -> None:
        if self.attached:
            self.method.detach(self.transformer)
            if self.batched_modulation is not None:
                self.batched_modulation.detach(self.transformer)
                self.batched_modulation = None
            if self.rotary is not None:
                self.rotary.detach(self.transformer)
                self.rotary = None
            remove_all(self.transformer, [CONTEXT_HOOK])
            self.attached = False

    def reset(self) -> None:
        """Call between samples: drops cached features and the per-sample call counters."""
        self.method.reset()
        if self.batched_modulation is not None:
            self.batched_modulation.reset()
        if self.rotary is not None:
            self.rotary.reset()
        self.runtime.reset_counts()

    # -- reporting ---------------------------------------------------------------------------
    @property
    def schedule(self) -> Schedule:
        return self.runtime.schedule

    @property
    def flops_ratio(self) -> float:
        return self.schedule.flops_ratio(self.cost.full, self.cost.cached)

    def sample_flops(self) -> int:
        """FLOPs of the transformer calls made since the last `reset`, as the calls really ran."""
        return self.runtime.full_calls * self.cost.full + self.runtime.cached_calls * self.cost.cached

    def summary(self) -> dict[str, Any]:
        return {
            "method": self.method.describe(),
            "schedule": str(self.schedule),
            "full_steps": self.schedule.num_full,
            "flops_full_step": self.cost.full,
            "flops_cached_step": self.cost.cached,
            "flops_ratio": self.flops_ratio,
        }


def accelerate(
    pipe: DiffusionPipeline,
    method: str | CacheMethod = "fora",
    ratio: float = 2.0,
    *,
    adapter: ModelAdapter | None = None,
    warmup: int = 1,
    spacing: str = "even",
    interval: int | None = None,
    method_params: dict[str, Any] | None = None,
    modulation: str = "per_step",
    **call: Any,
) -> Accelerator:
    """Attach `method` to `pipe` with the schedule whose FLOPs ratio is >= `ratio`.

    `call` is a representative pipeline call (prompt, num_inference_steps, height, width...): its
    shapes are the ones FLOPs are counted on. `modulation="batched"`: see `Accelerator`. Returns the
    attached `Accelerator`.
    """
    if isinstance(method, str):
        method = load_method(method, **(method_params or {}))
    if adapter is None:
        adapter = adapter_for(pipe.transformer)(name=type(pipe).__name__)
    if "prompt" in inspect.signature(pipe.__call__).parameters:  # not DiT: it takes class_labels
        call.setdefault("prompt", "a photo")
    accelerator = Accelerator(pipe, method, adapter, modulation)
    accelerator.plan(ratio, call, warmup=warmup, spacing=spacing, interval=interval)
    return accelerator.attach()
