"""`none`: every step FULL. The full-compute reference every other method is measured against."""

from __future__ import annotations

from lbridge.methods.base import CacheMethod


class FullCompute(CacheMethod):
    name = "none"
    accelerates = False

    def __init__(self, name: str = "none") -> None:
        super().__init__()

    def install(self, transformer, adapter, runtime) -> None:
        """No hooks: lbridge's context hook alone tracks the steps and counts the FLOPs."""
