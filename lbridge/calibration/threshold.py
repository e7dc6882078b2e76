"""Solving an adaptive method's threshold for a FLOPs ratio on the calibration prompts.

The FLOPs ratio reached at a threshold is measured, not modelled: the calibration prompts are
sampled with the method attached and every transformer call is counted as it really ran (FULL or
CACHED, FLOPs of each measured on the real shapes). The ratio grows with the threshold (in steps:
it is a count of skipped calls), so a doubling search brackets the target and a bisection finds the
smallest threshold that reaches it -- the one that skips least, i.e. the best quality at that ratio.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from lbridge.calibration.job import CalibrationJob
from lbridge.errors import LbridgeError

if TYPE_CHECKING:
    from lbridge.methods.adaptive import AdaptiveMethod

START = 0.01  # first threshold tried when bracketing (relative-change indicators are O(0.01-1))
MAX_DOUBLINGS = 40


def sample_prompts(job: CalibrationJob, threshold: float) -> Iterator[None]:
    """Sample each calibration prompt with the method attached at `threshold`; yields after each one
    (the solve reads the call counters there, the fits their recorders), then detaches."""
    acc = job.accelerator
    with acc.method.thresholded(threshold):
        acc.attach()
        try:
            for prompt in job.prompts:
                acc.reset()
                job.adapter.generate(job.pipe, prompt.text, prompt.seed)
                yield
        finally:
            acc.remove()


def reached_ratio(job: CalibrationJob, threshold: float) -> float:
    """FLOPs(full compute) / FLOPs(as run) over the calibration prompts at `threshold`."""
    runtime, cost = job.accelerator.runtime, job.accelerator.cost
    full = cached = 0
    for _ in sample_prompts(job, threshold):
        full, cached = full + runtime.full_calls, cached + runtime.cached_calls
    return (full + cached) * cost.full / (full * cost.full + cached * cost.cached)


def solve_threshold(method: AdaptiveMethod, job: CalibrationJob) -> dict[str, Any]:
    """The smallest threshold whose ratio on the calibration prompts is >= `ratio` (a report)."""
    target = float(job.cfg.ratio)
    tolerance = float(job.option("tolerance", 0.01))  # relative width of the final bracket
    trace: list[tuple[float, float]] = []

    def ratio_at(threshold: float) -> float:
        trace.append((threshold, reached_ratio(job, threshold)))
        return trace[-1][1]

    if method.explicit_threshold:  # given: report what it reaches, solve nothing
        reached = ratio_at(method.threshold)
        return _report(method.threshold, reached, target, trace, solved=False)
    ceiling = ratio_at(math.inf)
    if ceiling < target - 1e-9:
        raise LbridgeError(
            f"ratio={target:g} is above the maximum {ceiling:.2f} {method.name} reaches on the calibration "
            f"prompts (every candidate step skipped); choose ratio <= {ceiling:.2f}"
        )
    low, high = 0.0, START
    with tqdm(desc=f"solve {method.name} threshold", unit="run", leave=False) as progress:
        for _ in range(MAX_DOUBLINGS):
            progress.update()
            if ratio_at(high) >= target - 1e-9:
                break
            low, high = high, high * 2
        else:
            high = math.inf
        while math.isfinite(high) and high - low > tolerance * high:
            progress.update()
            middle = (low + high) / 2
            if ratio_at(middle) >= target - 1e-9:
                high = middle
            else:
                low = middle
    reached = dict(trace)[high]
    method.threshold = high
    return _report(high, reached, target, trace, solved=True)


def _report(
    threshold: float, reached: float, target: float, trace: list[tuple[float, float]], solved: bool
) -> dict[str, Any]:
    how = "solved" if solved else "given"
    return {
        "threshold": _json_number(threshold),
        "flops_ratio": reached,
        "search": [{"threshold": _json_number(t), "flops_ratio": r} for t, r in trace],
        "summary": [
            f"threshold {threshold:.6g} ({how}) reaches FLOPs ratio {reached:.3f}x on the calibration "
            f"prompts (target {target:g}x; {len(trace)} runs)"
        ],
    }


def _json_number(value: float) -> float | str:
    return value if math.isfinite(value) else "inf"  # JSON has no infinity; float("inf") reads it back
