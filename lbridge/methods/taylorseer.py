"""TaylorSeer (Liu et al., 2025): forecast a feature at a CACHED step from its Taylor expansion.

At each FULL step f the feature F_f and its divided differences up to `order` (against the previous
FULL step) are stored; at s = f + k the forecast is sum_i d_i k^i / i!. The arithmetic is diffusers'
own `TaylorSeerState`; lbridge drives it with its own step index and schedule instead of the call
counting of diffusers' hook, so it works for every model and every schedule (order 0 = FORA).
"""

from __future__ import annotations

import torch
from diffusers.hooks.taylorseer_cache import TaylorSeerState

from lbridge.errors import LbridgeError
from lbridge.methods.sites import SiteMethod
from lbridge.models.base import DTYPES
from lbridge.runtime.context import CacheRuntime
from lbridge.runtime.hooks import ModelHook


class TaylorForecastHook(ModelHook):
    def __init__(self, runtime: CacheRuntime, order: int, factors_dtype: torch.dtype) -> None:
        super().__init__()
        self.runtime, self.order, self.factors_dtype = runtime, order, factors_dtype
        self.states: dict[str, TaylorSeerState] = {}

    def _state(self) -> TaylorSeerState:
        branch, step = self.runtime.branch, self.runtime.step
        state = self.states.get(branch)
        if state is None or (state.last_update_step is not None and step <= state.last_update_step):
            # A new sample started (the step went back): differences with the last one are meaningless.
            state = self.states[branch] = TaylorSeerState(self.factors_dtype, max_order=self.order)
        state.current_step = step
        return state

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        state = self._state()
        if self.runtime.is_full:
            output = self.fn_ref.original_forward(*args, **kwargs)
            state.update((output,) if isinstance(output, torch.Tensor) else tuple(output))
            return output
        forecast = state.predict()
        return forecast[0] if len(forecast) == 1 else tuple(forecast)

    def reset(self) -> None:
        self.states.clear()


class TaylorSeer(SiteMethod):
    name = "taylorseer"

    def __init__(
        self, order: int = 2, site: str = "stack", factors_dtype: str = "float32", name: str = "taylorseer"
    ) -> None:
        super().__init__(site)
        if not isinstance(order, int) or order < 0:
            raise LbridgeError(f"method.order={order!r} must be an integer >= 0")
        if factors_dtype not in DTYPES:
            accepted = ", ".join(DTYPES)
            raise LbridgeError(f"unknown method.factors_dtype '{factors_dtype}' (accepted: {accepted})")
        self.order, self.factors_dtype = order, DTYPES[factors_dtype]

    def site_hook(self, runtime: CacheRuntime) -> TaylorForecastHook:
        return TaylorForecastHook(runtime, self.order, self.factors_dtype)

    def describe(self) -> dict:
        return {**super().describe(), "order": self.order}
