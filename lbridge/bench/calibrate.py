"""How long LearniBridge's calibration (the LoRA fit) takes on a config's real shapes.

Trajectories are recorded from the benchmark's own full-compute loop (random weights, random
latents per "prompt") with the recorder `lbridge collect` uses, written as the same safetensors
shards, and fitted by the same `fit_bridge` `lbridge calibrate` runs. Only the fit is timed, as
`calibration.json`'s `wall_s` is not: collection is a full-compute sampling cost.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lbridge.api import Accelerator
from lbridge.bench.models import DenoisingLoop
from lbridge.calibration.bridge_fit import fit_bridge
from lbridge.calibration.trajectories import RecordFinalBlockHook, Trajectory, save_shard
from lbridge.errors import LbridgeError
from lbridge.methods.base import load_method
from lbridge.models.base import ModelAdapter
from lbridge.runtime.hooks import register, remove_all
from lbridge.runtime.schedule import Schedule, solve

RECORDER = "lbridge.bench.record"


@dataclass
class BenchJob:
    """The part of `CalibrationJob` that `fit_bridge` reads."""

    adapter: ModelAdapter
    transformer: torch.nn.Module
    schedule: Schedule
    trajectories: list[Trajectory]
    options: dict[str, Any] = field(default_factory=dict)

    def option(self, key: str, default: Any) -> Any:
        return self.options.get(key, default)


def has_head(adapter: ModelAdapter) -> bool:
    return type(adapter).overrides("head")


def record_trajectories(
    loop: DenoisingLoop, adapter: ModelAdapter, root: Path, prompts: int
) -> list[Trajectory]:
    """Full-compute trajectories of `prompts` random latents, in `lbridge collect`'s shard format."""
    reference = Accelerator(loop, load_method("none"), adapter)
    reference.plan(1.0, {"num_inference_steps": loop.config.steps})
    reference.attach()
    final = adapter.blocks(loop.transformer)[-1]
    recorder = register(final, RecordFinalBlockHook(reference.runtime, final, loop.latents.dtype), RECORDER)
    latents = loop.latents
    shards = []
    try:
        for index in range(prompts):
            generator = torch.Generator().manual_seed(1000 + index)
            loop.latents = torch.randn(latents.shape, generator=generator).to(latents)
            recorder.reset()
            reference.reset()
            loop(loop.config.steps)
            shards.append(save_shard(root, index, recorder.tensors))
            recorder.reset()  # the shard is on disk: free the host copy before the next prompt
    finally:
        loop.latents = latents
        remove_all(loop.transformer, [RECORDER])
        reference.remove()
    return [Trajectory(root / name) for name in shards]


def time_bridge_fit(
    loop: DenoisingLoop, adapter: ModelAdapter, ratios: tuple[float, ...], prompts: int, steps: int
) -> dict[float, dict[str, Any]]:
    """Seconds of LearniBridge's fit for each ratio's schedule (one trajectory set for all ratios)."""
    results: dict[float, dict[str, Any]] = {}
    device = loop.latents.device
    with tempfile.TemporaryDirectory(prefix="lbridge-bench-") as scratch:
        trajectories = record_trajectories(loop, adapter, Path(scratch), prompts)
        method = load_method("learnibridge", loss="head" if has_head(adapter) else "block")
        acc = Accelerator(loop, method, adapter)
        acc.plan(1.0, {"num_inference_steps": loop.config.steps})  # the costs; schedules per ratio below
        for ratio in ratios:
            try:
                schedule = solve(loop.config.steps, acc.cost.full, acc.cost.cached, ratio)
            except LbridgeError as err:  # an unreachable ratio: the benchmark row already says so
                results[ratio] = {"note": str(err).split(";")[0]}
                continue
            job = BenchJob(adapter, loop.transformer, schedule, trajectories, {"steps": steps})
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            report = fit_bridge(method, job)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            results[ratio] = {"calibrate_s": time.perf_counter() - start, "pairs": report["pairs"],
                              "optimiser_steps": steps, "prompts": prompts}  # fmt: skip
    return results
