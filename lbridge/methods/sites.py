"""Methods that replace the outputs of chosen modules ("sites") at CACHED steps.

`site=stack`: every block is skipped at a CACHED step and the final block's output is replaced; only
the image embedding, the step embedding and the head run, with the current step's conditioning (the
text embedders, read by the blocks alone, do not: `CacheMethod.reuse_block_only_modules`).
`site=attn_mlp`: each block's attention and MLP outputs are replaced; the blocks still run their
(cheap) modulation, gates and residual adds with the current timestep (FORA's and TaylorSeer's
granularity in their papers).
"""

from __future__ import annotations

from abc import abstractmethod

from lbridge.errors import LbridgeError
from lbridge.methods.base import CacheMethod
from lbridge.runtime.context import CacheRuntime
from lbridge.runtime.hooks import ModelHook, SkipBlockHook

SITES = ("stack", "attn_mlp")


class SiteMethod(CacheMethod):
    def __init__(self, site: str = "stack") -> None:
        super().__init__()
        if site not in SITES:
            raise LbridgeError(f"unknown {self.name} site '{site}' (accepted: {', '.join(SITES)})")
        self.site = site

    @abstractmethod
    def site_hook(self, runtime: CacheRuntime) -> ModelHook:
        """The hook that produces a site's output at CACHED steps (and observes it at FULL steps)."""

    def install(self, transformer, adapter, runtime) -> None:
        blocks = adapter.blocks(transformer)
        if self.site == "stack":
            for block in blocks[:-1]:
                self.add_hook(block, SkipBlockHook(runtime, block), "skip")
            self.add_hook(blocks[-1], self.site_hook(runtime), "site")
            self.reuse_block_only_modules(transformer, adapter, runtime)
            return
        for block in blocks:
            for module in adapter.attn_mlp_sites(block):
                self.add_hook(module, self.site_hook(runtime), "site")

    def describe(self) -> dict:
        return {"name": self.name, "site": self.site}
