"""MagCache (Ma et al., 2025, "Magnitude-aware Cache"): diffusers' `MagCacheConfig` hooks, lbridge interface.

The norm of the block stack's residual (final block output - first block input) changes between
consecutive steps by a ratio that is nearly the same for every prompt: `mag_ratios`, one per step.
A CACHED step's error is estimated from them alone (accumulated |1 - product of ratios| since the last
FULL step), so the decision costs nothing: a step is skipped while that error is <= `threshold` and
at most `max_skip_steps` steps in a row; a skipped step adds the last FULL residual to its input.

`mag_ratios: fit` measures the ratios in `lbridge calibrate` on full-compute runs of the calibration
prompts (mean over tokens of |r_t| / |r_t-1|, averaged over prompts and CFG branches); `flux` uses
diffusers' published FLUX.1 ratios (interpolated to the number of steps); or give a list.
`retention_ratio` keeps the first fraction of steps FULL (lbridge applies it as warmup steps).

Since the verdict needs no probe, lbridge takes it before the call runs its text embedders (on the
first of `ModelAdapter.block_only_modules`), so that a CACHED call leaves them unrun as a stack
method's does: exact, since a skipped call passes the text stream through unread. diffusers' head
hook then decides again from the same state, and must agree (checked at every call).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from diffusers.hooks.hooks import StateManager
from diffusers.hooks.mag_cache import (
    FLUX_MAG_RATIOS,
    MagCacheBlockHook,
    MagCacheConfig,
    MagCacheHeadHook,
    MagCacheState,
)

from lbridge.calibration.job import CalibrationJob
from lbridge.calibration.threshold import sample_prompts
from lbridge.calibration.trajectories import block_hidden_input, block_hidden_output
from lbridge.errors import LbridgeError
from lbridge.methods.diffusers_cache import DiffusersBlockCache
from lbridge.runtime.context import CacheRuntime
from lbridge.runtime.hooks import (
    ModelHook,
    ReuseOutputHook,
    VerdictFirstReuseHook,
    register,
    remove_all,
)
from lbridge.runtime.schedule import Schedule

RATIO_MODES = ("fit", "flux", "a list of numbers")


class MagCache(DiffusersBlockCache):
    name = "magcache"

    def __init__(
        self,
        threshold: float | None = None,
        max_skip_steps: int = 3,
        retention_ratio: float = 0.2,
        mag_ratios: str | list[float] = "fit",
        calibration: dict[str, Any] | None = None,
        name: str = "magcache",
    ) -> None:
        super().__init__(threshold, calibration)
        if not isinstance(max_skip_steps, int) or max_skip_steps < 1:
            raise LbridgeError(f"method.max_skip_steps={max_skip_steps!r} must be an integer >= 1")
        if not isinstance(retention_ratio, int | float) or not 0 <= retention_ratio < 1:
            raise LbridgeError(f"method.retention_ratio={retention_ratio!r} must be a number in [0, 1)")
        if mag_ratios not in ("fit", "flux"):
            try:
                mag_ratios = [float(r) for r in mag_ratios]
            except (TypeError, ValueError):
                raise LbridgeError(
                    f"method.mag_ratios={mag_ratios!r} is not accepted ({', '.join(RATIO_MODES)})"
                ) from None
        self.max_skip_steps, self.retention_ratio = max_skip_steps, float(retention_ratio)
        self.ratio_mode = mag_ratios if isinstance(mag_ratios, str) else "given"
        self.mag_ratios = (
            FLUX_MAG_RATIOS.tolist()
            if mag_ratios == "flux"
            else (None if mag_ratios == "fit" else mag_ratios)
        )

    def candidates(self, num_steps: int, warmup: int) -> Schedule:
        retained = int(self.retention_ratio * num_steps + 0.5)  # diffusers' rounding
        return super().candidates(num_steps, max(warmup, retained))

    def state_class(self):
        return MagCacheState

    def install(self, transformer, adapter, runtime) -> None:
        steps = len(runtime.schedule)
        # Unfitted ratios are only ever used to measure costs (threshold +-inf decides alone).
        ratios = self.mag_ratios if self.mag_ratios is not None else [1.0] * steps
        self.config = MagCacheConfig(
            threshold=0.0, max_skip_steps=self.max_skip_steps, retention_ratio=0.0,
            num_inference_steps=steps, mag_ratios=ratios,
        )  # fmt: skip
        super().install(transformer, adapter, runtime)
        self.add_hook(adapter.blocks(transformer)[-1], HeadInputRelease(self.states), "release")
        self.reuse_block_only_modules(transformer, adapter, runtime)

    def block_only_hook(self, runtime: CacheRuntime) -> ReuseOutputHook:
        return VerdictFirstReuseHook(runtime, lambda: self.decide_early(runtime))

    def decide_early(self, runtime: CacheRuntime) -> None:
        """The current call's verdict, before any block runs (once per call)."""
        if runtime.decision is not None:
            return
        self.states.set_context(runtime.context)
        state = self.states.get_state()
        self.prepare_call(state, runtime, self.threshold_now(runtime))
        runtime.decide(not self.would_skip(state))

    def would_skip(self, state: MagCacheState) -> bool:
        """What diffusers' `MagCacheHeadHook` will decide from `state`, without changing it."""
        config, step = self.config, state.step_index
        scale = config.mag_ratios[step] if step < len(config.mag_ratios) else 1.0
        if step < int(config.retention_ratio * config.num_inference_steps + 0.5):
            return False
        error = state.accumulated_err + abs(1.0 - state.accumulated_ratio * scale)
        return (
            state.previous_residual is not None
            and error <= config.threshold
            and state.accumulated_steps + 1 <= config.max_skip_steps
        )

    def head_hook(self, states, runtime):
        return MagCacheHeadHook(states, self.config)

    def block_hook(self, states, runtime, tail):
        return MagCacheBlockHook(states, is_tail=tail, config=self.config)

    def prepare_call(self, state, runtime: CacheRuntime, threshold: float) -> None:
        if self.mag_ratios is None and math.isfinite(threshold):
            raise LbridgeError(
                "magcache mag_ratios=fit: run `lbridge calibrate` first, or set method.mag_ratios"
            )
        self.config.threshold = threshold
        state.step_index = runtime.step  # lbridge's clock, not diffusers' call count

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(), "max_skip_steps": self.max_skip_steps,
            "retention_ratio": self.retention_ratio, "mag_ratios": self.ratio_mode,
        }  # fmt: skip

    # -- calibration -------------------------------------------------------------------------
    def needs_fit(self) -> bool:
        return self.ratio_mode == "fit"

    def fit(self, job: CalibrationJob) -> dict[str, Any]:
        if self.ratio_mode != "fit":
            return {"mag_ratios": self.mag_ratios}
        return {"mag_ratios": magnitude_ratios(job)}

    def load_fitted(self, values: dict[str, Any]) -> None:
        if values.get("mag_ratios") is not None:
            self.mag_ratios = [float(r) for r in values["mag_ratios"]]


class HeadInputRelease(ModelHook):
    """Outermost on the last block: drops the first block's input that diffusers' head hook keeps.

    The tail reads it, at a FULL call, to form the residual; after the call nothing does, but diffusers
    keeps it until the branch's next call (and past the sample's end): one token tensor per CFG branch
    held between calls, beside the residual that is the cache."""

    def __init__(self, states: StateManager) -> None:
        super().__init__()
        self.states = states

    def post_forward(self, module: torch.nn.Module, output):
        self.states.get_state().head_block_input = None
        return output


class _ResidualTap(ModelHook):
    """Full compute: the first block's hidden input (`head`), or the residual's per-token norm (tail)."""

    def __init__(self, runtime: CacheRuntime, norms: dict, head: _ResidualTap | None = None) -> None:
        super().__init__()
        self.runtime, self.norms, self.head = runtime, norms, head
        self.first_input: torch.Tensor | None = None

    def pre_forward(self, module, *args, **kwargs):
        if self.head is None:
            self.first_input = block_hidden_input(module, args, kwargs)
        return args, kwargs

    def post_forward(self, module, output):
        if self.head is not None:
            residual = (block_hidden_output(module, output) - self.head.first_input).float()
            self.norms[(self.runtime.branch, self.runtime.step)] = torch.linalg.norm(residual, dim=-1)
        return output


def magnitude_ratios(job: CalibrationJob) -> list[float]:
    """mean_tokens |r_t| / |r_t-1| per step on full-compute runs, averaged over prompts and branches."""
    runtime = job.accelerator.runtime
    head, *_, tail = job.adapter.blocks(job.accelerator.transformer)
    norms: dict[tuple[str, int], torch.Tensor] = {}
    name = "lbridge.magcache.fit"
    first = register(head, _ResidualTap(runtime, norms), name)
    register(tail, _ResidualTap(runtime, norms, head=first), name)
    per_step: dict[int, list[float]] = {}
    try:
        for _ in sample_prompts(job, -math.inf):  # every step FULL
            for (branch, step), norm in norms.items():
                if (branch, step - 1) in norms:
                    ratio = (norm / (norms[(branch, step - 1)] + 1e-8)).mean()
                    per_step.setdefault(step, []).append(float(ratio))
            norms.clear()
    finally:
        remove_all(head, [name])
        remove_all(tail, [name])
    return [1.0] + [float(np.mean(per_step[s])) for s in range(1, len(job.accelerator.schedule))]
