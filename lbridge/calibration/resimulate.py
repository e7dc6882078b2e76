"""Trajectories along the *accelerated* sampler, labelled by full compute (trajectory-consistent pairs).

The calibration prompts are sampled with the method attached (its current calibration), and every
transformer call of that run is kept. Each kept call is then replayed with full compute while the
final block is recorded: the result has the same layout as a collected trajectory, but its states
are the ones the accelerated sampler really visits, so pairs built from it teach the method to
correct the drift its own errors cause.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from diffusers.hooks import ModelHook

from lbridge.calibration.job import CalibrationJob
from lbridge.calibration.trajectories import RecordFinalBlockHook, Trajectory, output_streams, save_shard
from lbridge.methods.base import CacheMethod
from lbridge.runtime.context import CacheRuntime, ManualClock
from lbridge.runtime.hooks import register, remove_all
from lbridge.runtime.schedule import Schedule

if TYPE_CHECKING:
    from lbridge.api import Accelerator

KEEPER = "lbridge.resimulate.keep"
RECORDER = "lbridge.resimulate.record"


def _detached(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, tuple | list):
        return type(value)(_detached(v) for v in value)
    return value


class KeepCallsHook(ModelHook):
    """Innermost on the transformer: keeps (branch, step, args, kwargs) of every call (of `steps`)."""

    def __init__(self, runtime: CacheRuntime, steps: set[int] | None = None) -> None:
        super().__init__()
        self.runtime, self.steps = runtime, steps
        self.calls: list[tuple[str, int, tuple, dict]] = []

    def pre_forward(self, module, *args, **kwargs):
        if self.steps is None or self.runtime.step in self.steps:
            self.calls.append((self.runtime.branch, self.runtime.step, _detached(args), _detached(kwargs)))
        return args, kwargs


@contextmanager
def keeping_calls(acc: Accelerator, steps: set[int] | None = None) -> Iterator[KeepCallsHook]:
    """Attach `acc`'s method for one accelerated run and keep its transformer calls (then detach)."""
    # Registered before `attach`, so lbridge's context hook (outermost) has set the step already.
    keeper = register(acc.transformer, KeepCallsHook(acc.runtime, steps), KEEPER)
    acc.attach()
    acc.reset()
    try:
        yield keeper
    finally:
        acc.remove()
        remove_all(acc.transformer, [KEEPER])


def replay(
    calls, transformer: torch.nn.Module, recorder: ModelHook, final: torch.nn.Module, steps: int
) -> None:
    """Run kept calls again with full compute (no lbridge method attached), `recorder` on the final block."""
    runtime = CacheRuntime(ManualClock(steps), Schedule.all_full(steps))
    recorder.runtime = runtime
    register(final, recorder, RECORDER)
    try:
        with torch.no_grad():
            for branch, step, args, kwargs in calls:
                runtime.clock.step = step
                runtime.enter_call(branch)
                transformer(*args, **kwargs)
    finally:
        remove_all(transformer, [RECORDER])


def accelerated_trajectories(job: CalibrationJob, method: CacheMethod, directory: Path) -> list[Trajectory]:
    """One full-compute-labelled trajectory per calibration prompt, along the accelerated sampler."""
    acc, adapter, pipe, transformer = job.accelerator, job.adapter, job.pipe, job.transformer
    final = adapter.blocks(transformer)[-1]
    dtype = next(final.parameters()).dtype
    directory.mkdir(parents=True, exist_ok=True)
    trajectories = []
    for prompt in job.prompts:
        with keeping_calls(acc) as keeper, torch.no_grad():
            adapter.generate(pipe, prompt.text, prompt.seed)
        recorder = RecordFinalBlockHook(acc.runtime, final, dtype)
        replay(keeper.calls, transformer, recorder, final, len(acc.schedule))
        name = save_shard(directory, prompt.index, recorder.tensors)
        trajectories.append(Trajectory(directory / name, prompt.text, prompt.seed))
    return trajectories


class CaptureOutputHook(ModelHook):
    """Keeps the final block's output streams per (branch, step) of a replay: full compute at the
    states the accelerated sampler visited."""

    def __init__(self) -> None:
        super().__init__()
        self.runtime: CacheRuntime | None = None  # set by `replay`
        self.outputs: dict[tuple[str, int], tuple[torch.Tensor, ...]] = {}

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        output = self.fn_ref.original_forward(*args, **kwargs)
        self.outputs[(self.runtime.branch, self.runtime.step)] = output_streams(output)
        return output
