"""FORA (Selvaraju et al., 2024): at CACHED steps reuse features computed at the last FULL step.

Two granularities (`site`):
- `stack`: reuse the output of the whole block stack. Every block is skipped at a CACHED step and
  the final block returns its output from the last FULL step; only the embeddings and the head run
  (with the current timestep's conditioning). The cheapest cached step.
- `attn_mlp`: as in the FORA paper, reuse each block's attention and MLP outputs; the blocks still
  run their (cheap) modulation, gates and residual adds with the current timestep.
"""

from __future__ import annotations

from lbridge.errors import LbridgeError
from lbridge.methods.base import CacheMethod
from lbridge.runtime.hooks import ReuseOutputHook, SkipBlockHook

SITES = ("stack", "attn_mlp")


class Fora(CacheMethod):
    name = "fora"

    def __init__(self, site: str = "stack", name: str = "fora") -> None:
        super().__init__()
        if site not in SITES:
            raise LbridgeError(f"unknown fora site '{site}' (accepted: {', '.join(SITES)})")
        self.site = site

    def install(self, transformer, adapter, runtime) -> None:
        blocks = adapter.blocks(transformer)
        if self.site == "stack":
            for block in blocks[:-1]:
                self.add_hook(block, SkipBlockHook(runtime, block), "skip")
            self.add_hook(blocks[-1], ReuseOutputHook(runtime), "reuse")
        else:
            for block in blocks:
                for site in adapter.attn_mlp_sites(block):
                    self.add_hook(site, ReuseOutputHook(runtime), "reuse")

    def describe(self) -> dict:
        return {"name": self.name, "site": self.site}
