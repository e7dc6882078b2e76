"""FORA (Selvaraju et al., 2024): at CACHED steps reuse the features of the last FULL step."""

from __future__ import annotations

from lbridge.methods.sites import SiteMethod
from lbridge.runtime.hooks import ReuseOutputHook


class Fora(SiteMethod):
    name = "fora"

    def __init__(self, site: str = "stack", name: str = "fora") -> None:
        super().__init__(site)

    def site_hook(self, runtime) -> ReuseOutputHook:
        return ReuseOutputHook(runtime)
