"""Adaptive methods: which steps are skipped is decided at run time, by a change indicator and a threshold.

TeaCache, FirstBlockCache and MagCache each measure, at every step, how much the computation has
changed since the last FULL step; a step is CACHED while that (accumulated) change stays under
`threshold`. The schedule only marks which steps are *candidates* (the first `warmup` steps are
always FULL); each method's probe gives its verdict with `CacheRuntime.decide`.

`ratio=` is reached by solving for the threshold on the calibration prompts (`lbridge calibrate`,
calibration/threshold.py): the smallest threshold whose FLOPs ratio, as the calls really ran, is
>= the target. Setting `method.threshold` skips the solve (the ratio is then only what it reaches;
every sample records its FLOPs and realised schedule).
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import torch

from lbridge.calibration.job import METADATA, CalibrationJob, read_calibration
from lbridge.calibration.threshold import solve_threshold
from lbridge.errors import LbridgeError
from lbridge.io import write_json
from lbridge.methods.base import CacheMethod
from lbridge.runtime.context import CacheRuntime
from lbridge.runtime.schedule import Schedule


class AdaptiveMethod(CacheMethod):
    adaptive: ClassVar[bool] = True
    #: `lbridge calibrate` needs no collected trajectories: the solve samples the calibration prompts.
    uses_trajectories: ClassVar[bool] = False

    def __init__(self, threshold: float | None = None, calibration: dict[str, Any] | None = None) -> None:
        super().__init__()
        if threshold is not None and (not isinstance(threshold, int | float) or threshold < 0):
            raise LbridgeError(
                f"method.threshold={threshold!r} must be a number >= 0, or null to solve it for `ratio`"
            )
        self.threshold = None if threshold is None else float(threshold)
        self.explicit_threshold = threshold is not None
        self.calibration = dict(calibration or {})

    # -- the run-time policy -------------------------------------------------------------------
    def candidates(self, num_steps: int, warmup: int) -> Schedule:
        """FULL where the step must run; CACHED marks a candidate the probe decides on."""
        return Schedule(tuple(step < warmup for step in range(num_steps)))

    @property
    def active_threshold(self) -> float:
        if self.threshold is None:
            raise LbridgeError(
                f"{self.name} has no threshold: run `lbridge calibrate` for this ratio first, "
                "or set method.threshold"
            )
        return self.threshold

    def threshold_now(self, runtime: CacheRuntime) -> float:
        """The threshold a probe applies to the current call: -inf at steps the schedule forces FULL."""
        if runtime.schedule.is_full(runtime.step):
            return -math.inf
        return self.active_threshold

    @contextmanager
    def thresholded(self, value: float) -> Iterator[None]:
        """Run with threshold `value` (math.inf: every candidate step is skipped), then restore it."""
        saved, self.threshold = self.threshold, value
        try:
            yield
        finally:
            self.threshold = saved

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "threshold": self.threshold}

    # -- calibration: what the threshold solve needs, and the artifact -------------------------------
    def fit(self, job: CalibrationJob) -> dict[str, Any]:
        """Method-specific fits from full-compute runs before the threshold is solved (default: none).

        Returns the fitted values to store in the artifact (JSON-serialisable)."""
        return {}

    @abstractmethod
    def load_fitted(self, values: dict[str, Any]) -> None:
        """Restore what `fit` returned."""

    def calibrate(self, job: CalibrationJob) -> dict[str, Any]:
        fitted = self.fit(job)
        self.load_fitted(fitted)
        return {**solve_threshold(self, job), "fitted": fitted}

    def load_calibration(self, directory: Path, transformer: torch.nn.Module, schedule: Schedule) -> None:
        if self.explicit_threshold and not self.needs_fit():
            return  # nothing to load: the threshold was given and nothing is fitted
        metadata = read_calibration(directory, self.name, schedule)
        self.load_fitted(metadata["fit"]["fitted"])
        if not self.explicit_threshold:
            self.threshold = float(metadata["fit"]["threshold"])

    def needs_fit(self) -> bool:
        """Whether sampling needs values only `lbridge calibrate` fits (e.g. coefficients=fit)."""
        return False

    def save_calibration(
        self, directory: Path, transformer: torch.nn.Module, metadata: dict[str, Any]
    ) -> None:
        write_json(directory / METADATA, metadata)
