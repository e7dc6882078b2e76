"""Trajectories along the *accelerated* sampler, labelled by full compute (trajectory-consistent pairs).

The calibration prompts are sampled with the method attached (its current calibration), and every
transformer call of that run is kept. Each kept call is then replayed with full compute while the
final block is recorded: the result has the same layout as a collected trajectory, but its states
are the ones the accelerated sampler really visits, so pairs built from it teach the method to
correct the drift its own errors cause.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers.hooks import ModelHook

from lbridge.calibration.job import CalibrationJob
from lbridge.calibration.trajectories import RecordFinalBlockHook, Trajectory, save_shard
from lbridge.methods.base import CacheMethod
from lbridge.runtime.context import CacheRuntime, ManualClock
from lbridge.runtime.hooks import register, remove_all
from lbridge.runtime.schedule import Schedule

KEEPER = "lbridge.resimulate.keep"
RECORDER = "lbridge.resimulate.record"


def _detached(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, tuple | list):
        return type(value)(_detached(v) for v in value)
    return value


class KeepCallsHook(ModelHook):
    """Innermost on the transformer: keeps (branch, step, args, kwargs) of every call."""

    def __init__(self, runtime: CacheRuntime) -> None:
        super().__init__()
        self.runtime = runtime
        self.calls: list[tuple[str, int, tuple, dict]] = []

    def pre_forward(self, module, *args, **kwargs):
        self.calls.append((self.runtime.branch, self.runtime.step, _detached(args), _detached(kwargs)))
        return args, kwargs


def accelerated_trajectories(job: CalibrationJob, method: CacheMethod, directory: Path) -> list[Trajectory]:
    """One full-compute-labelled trajectory per calibration prompt, along the accelerated sampler."""
    acc, adapter, pipe, transformer = job.accelerator, job.adapter, job.pipe, job.transformer
    final = adapter.blocks(transformer)[-1]
    directory.mkdir(parents=True, exist_ok=True)
    trajectories = []
    for prompt in job.prompts:
        # Registered before `attach`, so lbridge's context hook (outermost) has set the step already.
        keeper = register(transformer, KeepCallsHook(acc.runtime), KEEPER)
        acc.attach()
        acc.reset()
        try:
            with torch.no_grad():
                adapter.generate(pipe, prompt.text, prompt.seed)
        finally:
            acc.remove()
            remove_all(transformer, [KEEPER])
        trajectories.append(_replay(keeper.calls, transformer, final, len(acc.schedule), directory, prompt))
    return trajectories


def _replay(calls, transformer, final, steps: int, directory: Path, prompt) -> Trajectory:
    runtime = CacheRuntime(ManualClock(steps), Schedule.all_full(steps))
    dtype = next(final.parameters()).dtype
    recorder = register(final, RecordFinalBlockHook(runtime, final, dtype), RECORDER)
    try:
        with torch.no_grad():
            for branch, step, args, kwargs in calls:
                runtime.clock.step = step
                runtime.enter_call(branch)
                transformer(*args, **kwargs)
    finally:
        remove_all(transformer, [RECORDER])
    name = save_shard(directory, prompt.index, recorder.tensors)
    return Trajectory(directory / name, prompt.text, prompt.seed)
