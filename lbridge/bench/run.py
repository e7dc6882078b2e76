"""Latency vs FLOPs speedup of every method on one transformer config, in one process.

Each method is planned by `lbridge.api.Accelerator` (FLOPs of a FULL and a CACHED call counted with
FlopCounterMode, as `lbridge sample` does), its schedule solved for each target ratio, and the
denoising loop timed with the method's hooks installed: one warm-up run, then `repeats` timed runs,
device-synchronised. FLOPs per run are counted call by call as the calls ran.

Speedups are ratios of the *fastest* runs: interference (other jobs, a neighbour on the host) only
ever slows a run, so the fastest of a few is the closest to the machine's own speed (timeit's rule).
Paired timing (the default on CPU) times full compute again in every row, its runs alternating with
the method's: a shared VM's speed also drifts by 15-20% over minutes, and the fastest runs of both
then come from the same minutes (timing full compute once per method left the drift in the
efficiency column).

Adaptive methods (TeaCache, FirstBlockCache, MagCache) are timed on the static schedule of the
ratio: their probe runs at every candidate step with a finite threshold too large to trigger a
FULL step (TeaCache's distance and its host sync included), so what is timed is their real cached
path at a known FLOPs ratio; how well a solved threshold places the FULL steps is a quality question
(`make methods-results`), not a runtime one. Calibrated methods (L2P, TCC, LearniBridge) run
uncalibrated: their weights (reuse, zero priors, zero-initialised LoRA of the configured rank) cost
exactly what calibrated ones do.
"""

from __future__ import annotations

import os
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lbridge.api import Accelerator
from lbridge.bench.memory import cache_bytes, cache_watched, run_peak_bytes
from lbridge.bench.models import BenchConfig, DenoisingLoop
from lbridge.errors import LbridgeError
from lbridge.methods.base import load_method
from lbridge.models.base import ModelAdapter
from lbridge.runtime.compile import CompiledRegions, CompileStats
from lbridge.runtime.context import CacheRuntime, SchedulerClock
from lbridge.runtime.schedule import Schedule, solve

#: A threshold no indicator reaches: adaptive probes run and skip every candidate step.
NEVER = 1e30
DEFAULT_METHODS = (
    "none", "fora", "taylorseer", "foca", "toca", "teacache", "fbcache", "magcache", "l2p", "tcc",
    "learnibridge",
)  # fmt: skip
COLUMNS = (
    "method", "ratio_target", "mode", "schedule", "flops_speedup", "latency_speedup", "efficiency",
    "latency_s", "reference_s", "latency_spread", "cpu_time_speedup", "cpu_efficiency", "cache_mb",
    "run_peak_mb", "peak_mem_gb", "host_syncs", "calibrate_s", "regions", "graphs", "recompiles",
    "graph_breaks", "load_avg", "note",
)  # fmt: skip


def method_params(name: str, steps: int) -> dict[str, Any]:
    """Parameters that make a method runnable without calibration, at the cost it has calibrated."""
    if name in ("teacache", "fbcache"):
        return {"threshold": NEVER, **({"coefficients": None} if name == "teacache" else {})}
    if name == "magcache":
        return {"threshold": NEVER, "mag_ratios": [1.0] * steps, "max_skip_steps": steps}
    if name == "learnibridge":
        return {"loss": "block"}
    return {}


def host_syncs(run: Callable[[], object], device: torch.device) -> int | None:
    """Calls `run` once; on CUDA, the synchronising calls in it (`.item()`, device-to-host copies, ...).

    A sync stalls the host until the GPU drains, so the Python of the following CACHED steps can no
    longer hide behind queued GPU work: static methods should have none. None on CPU.
    """
    if device.type != "cuda":
        run()
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    seconds: list[float]
    cpu_seconds: list[float]  # this process's CPU time per run: less sensitive to other jobs' load
    flops: int
    realised: str
    cache_bytes: int
    peak_bytes: int | None
    syncs: int | None = None
    run_peak_bytes: int | None = None  # measured in one more, untimed run (`time_runs`)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def fastest(self) -> float:
        return min(self.seconds)

    @property
    def spread(self) -> float:
        """(max - min) / median over the timed repeats: how noisy this row is."""
        return (max(self.seconds) - min(self.seconds)) / self.median


def speedup(reference: list[float], method: list[float]) -> float:
    """Fastest full-compute run over the method's fastest: slowdowns from interference drop out."""
    return min(reference) / min(method)


class _Runs:
    """The timed runs of one contender, and what its last run left (cache, realised calls)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.cpu_seconds: list[float] = []
        self.peak: int | None = None
        self.held = 0

    def time(self, acc: Accelerator, loop: DenoisingLoop, steps: int) -> None:
        device = loop.latents.device
        acc.reset()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        _sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        loop(steps)
        _sync(device)
        self.seconds.append(time.perf_counter() - start)
        self.cpu_seconds.append(time.process_time() - cpu_start)
        if device.type == "cuda":
            self.peak = max(self.peak or 0, torch.cuda.max_memory_allocated(device))
        self.held = cache_bytes(acc)  # while attached: what the cache (and tables) hold at a run's end

    def timing(self, acc: Accelerator) -> Timing:
        flops, realised = acc.sample_flops(), acc.runtime.realised_schedule()  # of the last run
        return Timing(self.seconds, self.cpu_seconds, flops, realised, self.held, self.peak)


def time_runs(
    contenders: Sequence[CompiledRegions], loop: DenoisingLoop, steps: int, repeats: int, warmup: int,
    measure_last: bool = True,
) -> list[Timing]:  # fmt: skip
    """`warmup` untimed runs of each contender, then `repeats` rounds of one timed run of each in turn.

    With two contenders (full compute, a method) the runs alternate, each installed only for its own
    run, so a machine whose speed drifts during the measurement slows both alike. Host syncs and the
    run's peak memory are measured in one more, untimed run of the last contender (`measure_last`).
    """
    for contender in contenders if warmup else ():
        with contender.installed() as acc:
            for _ in range(warmup):
                acc.reset()
                loop(steps)
    runs = [_Runs() for _ in contenders]
    for _ in range(repeats):
        for contender, timed in zip(contenders, runs, strict=True):
            with contender.installed() as acc:
                timed.time(acc, loop, steps)
    if not repeats:
        return []
    timings = [timed.timing(contender.acc) for contender, timed in zip(contenders, runs, strict=True)]
    if measure_last:
        last, device = timings[-1], loop.latents.device
        with contenders[-1].installed() as acc:
            acc.reset()

            def counted_run() -> None:
                last.syncs = host_syncs(lambda: loop(steps), device)

            # Outermost: its own synchronisations stay out of the sync count. The cache is watched
            # after every call of this run: at its end a method may already have dropped it.
            with cache_watched(acc) as watch:
                last.run_peak_bytes = run_peak_bytes(counted_run, device)
            last.cache_bytes = max(last.cache_bytes, watch.most)
    return timings


@dataclass
class BenchOptions:
    ratios: tuple[float, ...] = (2, 3, 4, 5, 6)
    repeats: int = 3
    warmup_runs: int = 1
    schedule_warmup: int = 1
    compile_modes: tuple[bool, ...] = (False,)
    #: Time full compute in every row, alternating with the method (a shared machine drifts); when
    #: False, full compute is timed once per pass (a dedicated GPU: half the device time).
    paired: bool = True
    on_row: Callable[[dict[str, Any]], None] | None = None
    #: torch.compile keyword arguments (tests use backend="eager": dynamo's tracing without inductor).
    compile_options: dict[str, Any] = field(default_factory=dict)
    #: `Accelerator(modulation=...)` of every row, full compute's included (eager and compiled).
    modulation: str = "per_step"


class SpeedBench:
    """One transformer, one input, every (method, ratio) timed in the same process."""

    def __init__(self, config: BenchConfig, transformer: torch.nn.Module, adapter: ModelAdapter,
                 device: torch.device, dtype: torch.dtype, options: BenchOptions) -> None:  # fmt: skip
        self.config, self.adapter, self.options = config, adapter, options
        self.loop = DenoisingLoop(transformer, config, device, dtype)
        self.steps = config.steps
        self.rows: list[dict[str, Any]] = []
        self.full_compute: CompiledRegions | None = None  # the reference contender of the current pass
        self.reference: Timing | None = None  # full compute as timed in its own row

    def run(self, methods: list[str], compiled_methods: list[str] | None = None) -> list[dict[str, Any]]:
        """Eager, then compiled (when enabled), each pass starting with its full-compute reference."""
        for compiled in self.options.compile_modes:
            chosen = compiled_methods if compiled and compiled_methods is not None else methods
            for name in ["none", *[m for m in chosen if m != "none"]]:
                try:
                    self.bench_method(name, compiled)
                except Exception as err:  # e.g. no C++ compiler for inductor on CPU: a row says so
                    if not compiled:
                        raise
                    self.emit(
                        {
                            "method": name,
                            "mode": "compiled",
                            "note": f"compile failed: {type(err).__name__}: {err}"[:300],
                        }
                    )
        return self.rows

    def bench_method(self, name: str, compiled: bool) -> None:
        method = load_method(name, **method_params(name, self.steps))
        acc = Accelerator(self.loop, method, self.adapter, self.options.modulation)
        # Ratio 1: only the costs of a FULL and a CACHED call; each ratio's schedule is solved below.
        acc.plan(1.0, {"num_inference_steps": self.steps}, warmup=self.options.schedule_warmup)
        contender = CompiledRegions(acc, compiled, **self.options.compile_options)
        if name == "none":
            self.full_compute = contender
        ratios = self.options.ratios if method.accelerates else (1.0,)
        previous: tuple[Schedule, dict] | None = None
        for ratio in ratios:
            row = {"method": name, "ratio_target": ratio, "mode": "compiled" if compiled else "eager"}
            try:
                schedule = self.schedule_for(acc, ratio)
            except LbridgeError as err:
                self.emit({**row, "note": str(err).split(";")[0]})
                continue
            if previous is not None and previous[0] == schedule:  # same work: no need to time it again
                self.emit({**previous[1], "ratio_target": ratio, "note": "same schedule as the row above"})
                continue
            reference, result = self.time_schedule(contender, schedule, first=previous is None)
            row.update(self.describe(reference, result, contender.stats))
            self.emit(row)
            previous = (schedule, row)

    def schedule_for(self, acc: Accelerator, ratio: float) -> Schedule:
        if not acc.method.accelerates:
            return Schedule.all_full(self.steps)
        return solve(self.steps, acc.cost.full, acc.cost.cached, float(ratio), self.options.schedule_warmup)

    def time_schedule(
        self, contender: CompiledRegions, schedule: Schedule, first: bool
    ) -> tuple[Timing, Timing]:
        """Full compute and the method on `schedule`; full compute timed alongside when paired."""
        acc = contender.acc
        acc.runtime = CacheRuntime(SchedulerClock(self.loop.scheduler), schedule)
        # Every new schedule gets its warm-up: compiled regions may meet new shapes on a new pattern.
        # Full compute needs none: its graphs exist, and alternation makes every run follow a swap.
        warmup = max(self.options.warmup_runs, 1 if first else 0)
        contender.stats.mark_warm(lambda: time_runs([contender], self.loop, self.steps, 0, warmup))
        paired = self.options.paired and contender is not self.full_compute
        timed = [self.full_compute, contender] if paired else [contender]
        timings = time_runs(timed, self.loop, self.steps, self.options.repeats, 0)
        contender.stats.mark_timed()
        if contender is self.full_compute:
            self.reference = timings[0]
        return (timings[0] if paired else self.reference), timings[-1]

    def describe(self, reference: Timing, result: Timing, stats: CompileStats) -> dict:
        flops_x = reference.flops / result.flops
        latency_x = speedup(reference.seconds, result.seconds)
        # This process's CPU time: on shared cores the load-robust measure of the same work (on CUDA
        # the host mostly waits for the GPU: left blank).
        cpu_x = speedup(reference.cpu_seconds, result.cpu_seconds)
        if self.loop.latents.device.type == "cuda":
            cpu_x = None
        return {
            "schedule": result.realised,
            "flops_speedup": flops_x,
            "latency_speedup": latency_x,
            "efficiency": latency_x / flops_x,
            "latency_s": result.fastest,
            "reference_s": reference.fastest,
            "latency_spread": result.spread,
            "cpu_time_speedup": cpu_x,
            "cpu_efficiency": None if cpu_x is None else cpu_x / flops_x,
            "cache_mb": result.cache_bytes / 2**20,
            "run_peak_mb": None if result.run_peak_bytes is None else result.run_peak_bytes / 2**20,
            "peak_mem_gb": None if result.peak_bytes is None else result.peak_bytes / 2**30,
            "host_syncs": result.syncs,
            **stats.row(),
            "load_avg": os.getloadavg()[0],
        }

    def emit(self, row: dict[str, Any]) -> None:
        row = {k: row.get(k) for k in COLUMNS}
        self.rows.append(row)
        if self.options.on_row is not None:
            self.options.on_row(row)
