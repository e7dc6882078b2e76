"""L2P (Shen et al., 2026, "Beyond Fixed Formulas"): a learned linear predictor of cached features.

At a CACHED step s the block stack's output is predicted as sum_j w_{s,j} F_{f_j}, a combination of
the outputs F of the last m FULL steps f_1 > f_2 > ... (most recent first), with one weight vector
per step. Hand-crafted forecasts are fixed points of this family: w = (1) is reuse (FORA), and
`taylor_weights` gives TaylorSeer's forecast of any order as weights. `lbridge calibrate` fits the
weights on the full-compute trajectories `lbridge collect` records (calibration/l2p_fit.py); until
then the weights are reuse, which is also what the FLOPs of a CACHED step are counted with.

The feature is the final block's output (site=stack): the blocks before it are skipped at a CACHED
step, the prediction replaces the final block, and the head runs at the current step.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import Any

import torch
from diffusers.hooks.taylorseer_cache import TaylorSeerState

from lbridge.calibration.job import METADATA, CalibrationJob, read_calibration
from lbridge.calibration.trajectories import output_streams
from lbridge.errors import LbridgeError
from lbridge.io import write_json
from lbridge.methods.sites import SiteMethod
from lbridge.runtime.context import CacheRuntime
from lbridge.runtime.hooks import ModelHook
from lbridge.runtime.schedule import Schedule

REUSE = (1.0,)
INITS = ("reuse", "taylor1", "taylor2")  # what the fit shrinks towards (ridge)


def taylor_weights(full_steps: list[int], step: int, order: int) -> tuple[float, ...]:
    """TaylorSeer's forecast at `step` as weights on `full_steps` (most recent first).

    The forecast is linear in the features, so running diffusers' `TaylorSeerState` on unit vectors
    gives its weights exactly, quirks included (it divides every difference by the latest gap).
    """
    window = list(reversed(full_steps[: order + 1]))  # chronological
    basis = torch.eye(len(window), dtype=torch.float64)
    state = TaylorSeerState(torch.float64, max_order=order)
    for f, unit in zip(window, basis, strict=True):
        state.current_step = f
        state.update((unit,))
    state.current_step = step
    (weights,) = state.predict()
    return tuple(float(w) for w in reversed(weights))


def combine(weights: tuple[float, ...], past: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    """sum_j w_j past_j per stream, accumulated in float32 and returned in the features' dtype."""
    streams = []
    for i, newest in enumerate(past[0]):
        total = newest.float() * weights[0]
        for w, features in zip(weights[1:], past[1:], strict=False):
            total = total + features[i].float() * w
        streams.append(total.to(newest.dtype))
    return tuple(streams)


class LinearPredictorHook(ModelHook):
    """On the final block. FULL: run it, remember its output. CACHED: a weighted sum of remembered ones."""

    def __init__(self, runtime: CacheRuntime, weights: dict[int, tuple[float, ...]], history: int) -> None:
        super().__init__()
        self.runtime, self.weights, self.history = runtime, weights, history
        self.past: dict[str, deque] = {}

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        branch, step = self.runtime.branch, self.runtime.step
        past = self.past.get(branch)
        if self.runtime.is_full:
            output = self.fn_ref.original_forward(*args, **kwargs)
            if past is None or step <= past[0][0]:  # a new sample: the old history is another trajectory
                past = self.past[branch] = deque(maxlen=self.history)
            past.appendleft((step, output))
            return output
        if not past:
            raise RuntimeError(f"CACHED step {step} on branch '{branch}' before any FULL step")
        weights = self.weights.get(step, REUSE)
        if weights == REUSE:
            return past[0][1]  # reuse: the remembered output itself, bit for bit
        if len(weights) > len(past):
            raise LbridgeError(
                f"l2p weights for step {step} combine {len(weights)} FULL steps but only {len(past)} ran: "
                "calibrate with the same schedule"
            )
        streams = combine(weights, [output_streams(output) for _, output in past])
        return streams[0] if isinstance(past[0][1], torch.Tensor) else streams

    def reset(self) -> None:
        self.past.clear()


class L2P(SiteMethod):
    name = "l2p"

    def __init__(
        self,
        history: int = 3,
        ridge: float = 1e-4,
        init: str = "reuse",
        calibration: dict[str, Any] | None = None,
        name: str = "l2p",
    ) -> None:
        super().__init__("stack")
        if not isinstance(history, int) or history < 1:
            raise LbridgeError(f"method.history={history!r} must be an integer >= 1")
        if not isinstance(ridge, int | float) or ridge < 0:
            raise LbridgeError(f"method.ridge={ridge!r} must be a number >= 0")
        if init not in INITS:
            raise LbridgeError(f"unknown method.init '{init}' (accepted: {', '.join(INITS)})")
        self.history, self.ridge, self.init = history, float(ridge), init
        self.calibration = dict(calibration or {})
        # Shared with every hook this method installs: loading weights updates attached hooks too.
        self.weights: dict[int, tuple[float, ...]] = {}

    def site_hook(self, runtime: CacheRuntime) -> LinearPredictorHook:
        return LinearPredictorHook(runtime, self.weights, self.history)

    def prior_weights(self, schedule: Schedule, step: int) -> tuple[float, ...]:
        """The hand-crafted weights the fit shrinks towards (`init`): reuse or a Taylor forecast."""
        fulls = schedule.full_history(step, self.history)
        if self.init == "reuse":
            return (1.0,) + (0.0,) * (len(fulls) - 1)
        order = min(int(self.init.removeprefix("taylor")), len(fulls) - 1)
        weights = taylor_weights(fulls, step, order)
        return weights + (0.0,) * (len(fulls) - len(weights))

    def set_weights(self, weights: dict[int, tuple[float, ...]]) -> None:
        self.weights.clear()
        self.weights.update({int(s): tuple(float(x) for x in w) for s, w in weights.items()})

    def describe(self) -> dict:
        return {"name": self.name, "history": self.history, "ridge": self.ridge, "init": self.init}

    # -- calibration -------------------------------------------------------------------------
    def calibrate(self, job: CalibrationJob) -> dict[str, Any]:
        from lbridge.calibration.l2p_fit import fit_weights

        return fit_weights(self, job)

    def load_calibration(self, directory: Path, transformer: torch.nn.Module, schedule: Schedule) -> None:
        metadata = read_calibration(directory, self.name, schedule)
        self.set_weights(metadata["weights"])

    def save_calibration(
        self, directory: Path, transformer: torch.nn.Module, metadata: dict[str, Any]
    ) -> None:
        weights = {str(s): list(w) for s, w in sorted(self.weights.items())}
        write_json(directory / METADATA, {**metadata, "weights": weights})
