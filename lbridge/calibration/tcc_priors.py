"""TCC's offline priors: mean deviations between full-compute and calibrated cached features.

`iterative` (the method): for each CACHED step s in order, every calibration prompt is sampled with
the accelerated sampler and the priors already fixed for the steps before s, stopping right after
s; c_s = mean over prompts of F_s - F~_s, where F~_s is the base method's cached feature on that
re-simulated trajectory and F_s the full-compute feature it stands for:
  target=local      full compute at the very state the accelerated run reached (its calls at s are
                    kept and replayed with every block; calibration/resimulate.py),
  target=reference  the prompt's full-compute trajectory (`lbridge collect`), which also asks the
                    prior to pull the trajectory back onto the reference.
Each run stops after its step, so the cost is about (CACHED steps / 2) samples per prompt, most of
them made of cheap CACHED steps.

`naive`: every prior from one uncorrected accelerated run per prompt. With a single CACHED step the
two coincide; with more, the difference is what the trajectory consistency buys.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch
from tqdm import tqdm

from lbridge.calibration.job import CalibrationJob
from lbridge.calibration.resimulate import CaptureOutputHook, keeping_calls, replay
from lbridge.calibration.trajectories import Trajectory, recorded_output
from lbridge.runtime.context import CacheRuntime
from lbridge.runtime.hooks import ModelHook, register, remove_all

if TYPE_CHECKING:
    from lbridge.methods.tcc import Priors, Tcc

Features = dict[tuple[str, int], tuple[torch.Tensor, ...]]


STOPPER = "lbridge.tcc.stop"


class StopSampling(Exception):  # noqa: N818 -- control flow of the calibration runs, never reaches a user
    """Raised at the first call after the step a calibration run needs: the rest would be wasted."""


class StopAfterHook(ModelHook):
    """On the transformer, for one calibration run: ends it before any block of a later step runs."""

    def __init__(self, runtime: CacheRuntime, stop_after: int) -> None:
        super().__init__()
        self.runtime, self.stop_after = runtime, stop_after

    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
        if self.runtime.step > self.stop_after:
            raise StopSampling
        return args, kwargs


class DeviationMeans:
    """Running sums of F_s - F~_s per (branch, step), reduced to the method's granularity."""

    def __init__(self, granularity: str) -> None:
        self.granularity = granularity
        self.sums: dict[tuple[str, int], list[torch.Tensor]] = {}
        self.counts: dict[tuple[str, int], int] = {}
        self.dtypes: dict[tuple[str, int], list[torch.dtype]] = {}

    def add(
        self, key: tuple[str, int], full: tuple[torch.Tensor, ...], cached: tuple[torch.Tensor, ...]
    ) -> None:
        deviation = [f.to(c.device, torch.float32) - c.float() for f, c in zip(full, cached, strict=True)]
        if key in self.sums:
            deviation = [s + d for s, d in zip(self.sums[key], deviation, strict=True)]
        self.sums[key] = deviation
        self.counts[key] = self.counts.get(key, 0) + 1
        self.dtypes[key] = [c.dtype for c in cached]

    def priors(self) -> Priors:
        return {
            key: tuple(
                self._reduce(s / self.counts[key]).to(d) for s, d in zip(sums, self.dtypes[key], strict=True)
            )
            for key, sums in self.sums.items()
        }

    def _reduce(self, mean: torch.Tensor) -> torch.Tensor:
        # token: one value per token and channel (averaged over the batch); channel: per channel only.
        dims = (0,) if self.granularity == "token" else tuple(range(mean.dim() - 1))
        return mean.mean(dim=dims, keepdim=True)


def accelerated_run(
    job: CalibrationJob, method: Tcc, prompt, steps: set[int], stop_after: int | None, keep: bool
) -> tuple[Features, list]:
    """One accelerated run under the current priors: the base's cached features at `steps` (before
    their prior), and the transformer calls of those steps when `keep`."""
    cached: Features = {}

    def on_cached(branch: str, step: int, streams: tuple[torch.Tensor, ...]) -> None:
        if step in steps:
            cached[(branch, step)] = streams

    acc = job.accelerator
    method.probe.on_cached = on_cached
    if stop_after is not None:  # registered first, so inside the context hook: the step is set
        register(acc.transformer, StopAfterHook(acc.runtime, stop_after), STOPPER)
    try:
        with keeping_calls(acc, steps if keep else set()) as keeper, torch.no_grad():
            try:
                job.adapter.generate(job.pipe, prompt.text, prompt.seed)
            except StopSampling:
                pass
    finally:
        method.probe.clear()
        remove_all(acc.transformer, [STOPPER])
    return cached, keeper.calls


def full_features(job: CalibrationJob, target: str, trajectory: Trajectory, calls: list, keys) -> Features:
    """What each cached feature should have been: full compute at the visited state, or the reference."""
    final = job.adapter.blocks(job.transformer)[-1]
    if target == "reference":
        return {(b, s): recorded_output(trajectory, final, b, s) for b, s in keys}
    capture = CaptureOutputHook()
    replay(calls, job.transformer, capture, final, len(job.schedule))
    return capture.outputs


def mean_deviations(job: CalibrationJob, method: Tcc, steps: set[int], stop_after: int | None) -> Priors:
    """c_s for `steps`, from one accelerated run per calibration prompt under the current priors."""
    target = method.calibration.get("target", "local")
    means = DeviationMeans(method.granularity)
    for prompt, trajectory in zip(job.prompts, job.trajectories, strict=True):
        cached, calls = accelerated_run(job, method, prompt, steps, stop_after, keep=target == "local")
        full = full_features(job, target, trajectory, calls, cached.keys())
        for key, streams in cached.items():
            means.add(key, full[key], streams)
    return means.priors()


def fit_priors(method: Tcc, job: CalibrationJob) -> dict[str, Any]:
    target = method.calibration.get("target", "local")
    schedule = job.schedule
    cached = [s for s in range(len(schedule)) if not schedule.is_full(s)]
    mode = method.calibration.get("mode", "iterative")
    method.priors.clear()
    start = time.perf_counter()
    if mode == "naive":
        method.priors.update(mean_deviations(job, method, set(cached), None))
        runs = len(job.prompts)
    else:
        for step in tqdm(cached, desc="tcc priors", unit="step"):
            # Priors of the steps before `step` are in place: this run follows the calibrated trajectory.
            method.priors.update(mean_deviations(job, method, {step}, step))
        runs = len(cached) * len(job.prompts)
    seconds = time.perf_counter() - start
    return {
        "mode": mode,
        "target": target,
        "sampler_runs": runs,
        "seconds": seconds,
        "prior_norm": {f"{b}/{s}": _norm(method.priors[(b, s)]) for b, s in sorted(method.priors)},
        "summary": [
            f"{mode} priors (target {target}) for {len(cached)} CACHED steps x "
            f"{len({b for b, _ in method.priors})} branches from {runs} accelerated runs in {seconds:.1f} s"
        ],
    }


def _norm(prior: tuple[torch.Tensor, ...]) -> float:
    """RMS of a prior (per element): how large the correction is."""
    total = sum(float(c.float().pow(2).sum()) for c in prior)
    return (total / sum(c.numel() for c in prior)) ** 0.5
