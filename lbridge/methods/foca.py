"""FoCa, "Forecast then Calibrate" (Zheng et al., 2025, arXiv 2508.16211): feature caching as an ODE solve.

The paper models a site's feature along the denoising trajectory as the solution of a feature-ODE
dF/dt = g(F, t). FULL steps give exact features; the CACHED steps between them are integrated one
solver step at a time with a BDF2 *forecast* followed by a Heun *calibration* (predictor-corrector),
instead of one long extrapolation from the last FULL step (TaylorSeer), which the paper blames for the
error growth at large intervals. The interval N of the paper is lbridge's schedule (`ratio`, or
`schedule.spacing=interval schedule.interval=N`), not a parameter of this method.

Mapping to lbridge, per site and per CFG branch (s = lbridge's step index, the solver's time):
  A_p, A_l    the two most recent FULL features, at s_p < s_l (the paper's cached full-step features)
  g           = (A_l - A_p) / (s_l - s_p), the feature-ODE's right-hand side estimated from them; it is
              the only derivative computed from exact features, and it is held over the gap
  Y_{k-1},Y_k the two most recent points of the solve, at s_{k-1} < s_k: FULL features or the
              calibrated features of earlier CACHED steps (never a lower-order fallback)
  s           the CACHED step; h = s - s_k, h' = s_k - s_{k-1}, w = h / h'

Forecast, the variable-step BDF2 formula (for w = 1 the paper's 4/3, -1/3, 2/3 coefficients), with the
unknown slope at the new point replaced by g:
  F^ = [(1 + w)^2 Y_k - w^2 Y_{k-1} + (1 + w) h g] / (1 + 2w)
Calibrate, Heun (the trapezoidal rule), with the start slope g and the end slope the forecast's own
secant (F^ - Y_k) / h:
  F = Y_k + (h / 2) [g + (F^ - Y_k) / h] = (Y_k + h g) / 2 + F^ / 2
F is returned and becomes the next point of the solve, so the next CACHED step integrates from it.

Why these choices (read them with the caveat below):
- Positions are step indices, not sigma or the timestep: the paper's interval N and its solver steps
  count denoising steps, lbridge's other forecasters (TaylorSeer) use step distances too, and the step
  is always known (the sigma is None under ManualClock and may live on the GPU). Unequal gaps, which
  lbridge's schedule solver produces, enter through the variable-step coefficients above, which reduce
  to the paper's equal-step ones when the gaps are equal.
- The corrector of an ODE solver evaluates g at the forecast; here that would mean running the site,
  which is what a CACHED step avoids. The end slope is therefore the forecast's secant (lbridge's sites
  give nothing cheaper), and the start slope is the FULL-step estimate g.
- Consistency: if the points of the solve lie on a line of slope g (a feature linear in s, once two
  FULL steps were seen), F^ and F are exactly that line. For other features the solve is not a
  polynomial extrapolation: the equal-step recurrence F = 7/6 Y_k - 1/6 Y_{k-1} + 5/6 h g has the
  roots 1 and 1/6, so a disturbance of the history is damped instead of amplified with the distance
  to the last FULL step (the paper's stability argument for large intervals).
- Fewer than two FULL steps seen: no slope yet, so the CACHED step reuses the last FULL feature
  (order 0, as TaylorSeer falls back); such reuses are not points of the solve.
- `calibrate=false` returns F^ instead of F (the paper's forecast-only ablation).

Caveat: the paper's method section could not be read when this was written (only its abstract and
secondary descriptions of it: a BDF2 predictor with a Heun corrector). The two formulas are the
standard BDF2 and Heun steps applied to the quantities above; how the paper estimates the slopes may
differ. See the method's tests for exactly what is computed.

Measured on the tiny model (20 prompts, site=stack, PSNR vs full compute at ratios 2/3/4/5): FoCa
44.5/37.7/30.9/22.9 dB, forecast only 44.8/36.4/26.4/19.9 dB, linear extrapolation of the FULL steps
(taylorseer order=1, which is this solve when its history is restarted at every FULL step)
44.0/37.7/32.7/26.2 dB: the calibration matters, but carrying the solve across FULL steps costs
accuracy at long intervals on this model.

Memory per site and branch: at most four tensors (two FULL features, two points of the solve; a FULL
feature that is both is stored once), in `compute_dtype`; outputs are cast back to the feature dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lbridge.errors import LbridgeError
from lbridge.methods.sites import SiteMethod
from lbridge.models.base import DTYPES
from lbridge.runtime.context import CacheRuntime
from lbridge.runtime.hooks import ModelHook

Features = tuple[torch.Tensor, ...]


@dataclass
class FocaState:
    """One branch's solve: the last FULL features, the last points of the solve, the last step seen."""

    anchors: list[tuple[float, Features]] = field(default_factory=list)  # oldest first, at most 2
    points: list[tuple[float, Features]] = field(default_factory=list)  # oldest first, at most 2
    dtypes: tuple[torch.dtype, ...] = ()
    last_step: int | None = None

    def observe(self, position: float, features: Features) -> None:
        """A FULL step: an exact feature, both a new anchor and a new point of the solve."""
        self.anchors = [*self.anchors[-1:], (position, features)]
        self.points = [*self.points[-1:], (position, features)]

    def advance(self, position: float, calibrate: bool) -> Features:
        """A CACHED step: forecast then calibrate from the last point of the solve to `position`."""
        if len(self.anchors) < 2:
            return self.anchors[-1][1]  # no slope yet: reuse, not a point of the solve
        (s_p, a_p), (s_l, a_l) = self.anchors
        (s_km1, y_km1), (s_k, y_k) = self.points
        h = position - s_k
        w = h / (s_k - s_km1)
        # F^ and F are fixed linear combinations of Y_k, Y_{k-1}, A_l and A_p (g = (A_l - A_p) / gap):
        # the scalar weights are folded first, so a CACHED step makes one pass per term over each
        # feature instead of a dozen temporaries (memory-bound work that FLOPs do not count).
        c_k, c_km1, c_g = (1 + w) ** 2 / (1 + 2 * w), -(w**2) / (1 + 2 * w), (1 + w) * h / (1 + 2 * w)
        if calibrate:  # F = (Y_k + h g) / 2 + F^ / 2
            c_k, c_km1, c_g = 0.5 + 0.5 * c_k, 0.5 * c_km1, 0.5 * h + 0.5 * c_g
        c_g /= s_l - s_p
        features = tuple(
            (yk * c_k).add_(ykm1, alpha=c_km1).add_(al, alpha=c_g).add_(ap, alpha=-c_g)
            for ap, al, ykm1, yk in zip(a_p, a_l, y_km1, y_k, strict=True)
        )
        self.points = [self.points[-1], (position, features)]
        return features


class FocaHook(ModelHook):
    """FULL step: run the site and record its output. CACHED step: return the FoCa solve's next point."""

    def __init__(self, runtime: CacheRuntime, calibrate: bool, compute_dtype: torch.dtype) -> None:
        super().__init__()
        self.runtime, self.calibrate, self.compute_dtype = runtime, calibrate, compute_dtype
        self.states: dict[str, FocaState] = {}

    def _state(self) -> FocaState:
        branch, step = self.runtime.branch, self.runtime.step
        state = self.states.get(branch)
        if state is None or (state.last_step is not None and step <= state.last_step):
            # A new sample started (the step went back): the last one's features say nothing about it.
            state = self.states[branch] = FocaState()
        state.last_step = step
        return state

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        state = self._state()
        position = float(self.runtime.step)
        if self.runtime.is_full:
            output = self.fn_ref.original_forward(*args, **kwargs)
            tensors = (output,) if isinstance(output, torch.Tensor) else tuple(output)
            state.dtypes = tuple(t.dtype for t in tensors)
            state.observe(position, tuple(t.detach().to(self.compute_dtype, copy=True) for t in tensors))
            return output
        if not state.anchors:
            raise RuntimeError(
                f"CACHED step {self.runtime.step} on branch '{self.runtime.branch}' before any FULL step"
            )
        features = state.advance(position, self.calibrate)
        result = tuple(f.to(dtype) for f, dtype in zip(features, state.dtypes, strict=True))
        return result[0] if len(result) == 1 else result

    def reset(self) -> None:
        self.states.clear()


class Foca(SiteMethod):
    name = "foca"

    def __init__(
        self,
        calibrate: bool = True,
        site: str = "stack",
        compute_dtype: str = "float32",
        name: str = "foca",
    ) -> None:
        super().__init__(site)
        if not isinstance(calibrate, bool):
            raise LbridgeError(f"method.calibrate={calibrate!r} must be true or false")
        if compute_dtype not in DTYPES:
            accepted = ", ".join(DTYPES)
            raise LbridgeError(f"unknown method.compute_dtype '{compute_dtype}' (accepted: {accepted})")
        self.calibrate, self.compute_dtype = calibrate, DTYPES[compute_dtype]

    def site_hook(self, runtime: CacheRuntime) -> FocaHook:
        return FocaHook(runtime, self.calibrate, self.compute_dtype)

    def describe(self) -> dict:
        return {**super().describe(), "calibrate": self.calibrate}
