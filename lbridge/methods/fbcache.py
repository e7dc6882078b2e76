"""FirstBlockCache (ParaAttention; diffusers' `FirstBlockCacheConfig`): diffusers' hooks, lbridge's interface.

The first block always runs. When the relative mean absolute change of its residual (output - input)
against the last FULL step's is <= `threshold`, the other blocks are skipped and the last FULL step's
residual of the remaining blocks is added to the first block's output.
"""

from __future__ import annotations

from typing import Any

from diffusers.hooks.first_block_cache import FBCBlockHook, FBCHeadBlockHook, FBCSharedBlockState

from lbridge.methods.diffusers_cache import DiffusersBlockCache


class FirstBlockCache(DiffusersBlockCache):
    name = "fbcache"

    def __init__(
        self, threshold: float | None = None, calibration: dict[str, Any] | None = None, name: str = "fbcache"
    ) -> None:
        super().__init__(threshold, calibration)

    def state_class(self):
        return FBCSharedBlockState

    def head_hook(self, states, runtime):
        self.head = FBCHeadBlockHook(states, threshold=0.0)
        return self.head

    def block_hook(self, states, runtime, tail):
        return FBCBlockHook(states, is_tail=tail)

    def prepare_call(self, state, runtime, threshold: float) -> None:
        self.head.threshold = threshold  # read by the head hook's comparison
