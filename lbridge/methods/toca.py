"""ToCa (Zou et al., ICLR 2025): token-wise feature caching.

Granularity is FORA's `site=attn_mlp` (each block's attention and MLP outputs; the blocks still run
their modulation, gates and residual adds). A FULL step runs every module and fills, per CFG branch,
each module's output cache and a per-token *cache age* (steps since the token's cached value was
computed). At a CACHED step:

- **Token-wise modules** (the feed-forward / MLP sites): every token ages by one, then the
  `refresh_ratio` fraction of tokens with the highest score is gathered, run through the module,
  and scattered into the cached output; their age resets to 0, the other tokens keep their cached
  value. An MLP acts on each token alone, so a refreshed token's output is exactly the full
  computation for the current input; the FLOPs counted are those of the gathered tokens only.
- **Attention**: `attention=reuse` (default) returns the last FULL step's output, as FORA does;
  `attention=recompute` runs it in full at every step. ToCa also refreshes attention for the
  selected query tokens, which needs the query projection split from the key/value projections
  inside each family's attention processor (FLUX/Qwen/Hunyuan joint text+image attention with
  rotary embeddings, Wan/PixArt cross-attention...). `ModelAdapter.attn_mlp_sites` exposes only
  whole modules, and running attention on the selected tokens alone would change what they attend
  to (not exact), so token-wise attention is left out rather than approximated.

Scores (which tokens are refreshed):
- `score=age`: the paper's cache-frequency score: the tokens cached for the most consecutive steps
  first, so over successive CACHED steps every token is refreshed in turn.
- `score=static`: the same tokens at every CACHED step (the first ones in `tie_break` order): an
  ablation; the paper's attention-map scores are not offered, because SDPA kernels never
  materialise the attention map and computing it would cost extra.
- `tie_break=spread` (default) orders equal scores along a van der Corput sequence over token
  positions, so every run of consecutive picks is spread evenly over the sequence (a layout-free
  stand-in for the paper's spatial-uniformity score, which needs the 2-D token grid);
  `tie_break=raster` takes the lowest token index first.

Token-wise and attention modules are told apart by type: diffusers attention modules
(`Attention`, `AttentionModuleMixin`) are attention, every other site is a feed-forward acting on
tokens along dim 1 (true of every adapter's `attn_mlp_sites`). `refresh_ratio=0` is FORA
`site=attn_mlp` bit for bit; `refresh_ratio=1` recomputes every token-wise module on its full input.
A module the block applies elementwise to a site's output (`ModelAdapter.elementwise_after`: the GELU
after FLUX's single-block `proj_mlp`) keeps its output too and recomputes the same tokens only, so a
CACHED step does not redo it over every token.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TypeVar

import torch
from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_processor import Attention

from lbridge.errors import LbridgeError
from lbridge.methods.base import CacheMethod
from lbridge.runtime.context import CacheRuntime
from lbridge.runtime.hooks import ModelHook, ReuseOutputHook

SCORES = ("age", "static")
TIE_BREAKS = ("spread", "raster")
ATTENTION = ("reuse", "recompute")


@functools.lru_cache(maxsize=16)
def spread_order(num_tokens: int) -> torch.Tensor:
    """Token positions in van der Corput order: every run of consecutive entries is evenly spread."""
    bits = max(num_tokens - 1, 1).bit_length()
    j = torch.arange(1 << bits)
    reversed_j = torch.zeros_like(j)
    for b in range(bits):  # bit reversal: j / 2^bits -> its radical inverse in base 2
        reversed_j |= ((j >> b) & 1) << (bits - 1 - b)
    positions = (reversed_j * num_tokens) >> bits  # floor(radical inverse * n): covers 0..n-1
    first = torch.full((num_tokens,), len(j), dtype=torch.long)
    first.scatter_reduce_(0, positions, j, reduce="amin")  # keep each position's first appearance
    return first.argsort()


def tie_rank(num_tokens: int, tie_break: str) -> torch.Tensor:
    """rank[i]: where token i comes among equal scores (0 = picked first)."""
    if tie_break == "raster":
        return torch.arange(num_tokens)
    return spread_order(num_tokens).argsort()


def refresh_indices(score: torch.Tensor, rank: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` tokens with the highest integer score; equal scores go by lowest `rank` first."""
    n = score.numel()
    key = score * n + (n - 1 - rank)  # distinct keys: the choice is deterministic on any device
    return key.topk(count).indices.sort().values


def refresh_count(refresh_ratio: float, num_tokens: int) -> int:
    """Tokens recomputed per CACHED step: the ratio of the sequence, rounded half up."""
    return min(num_tokens, int(refresh_ratio * num_tokens + 0.5))


@dataclass
class CachedOutput:
    """A module's output kept across steps, into which refreshed tokens are written."""

    output: torch.Tensor
    # The FULL step's output may still be held by whoever received it: the first refresh copies it,
    # later ones write in place (a full-tensor copy per module per CACHED step saved).
    owned: bool = False

    def write(self, index: torch.Tensor, fresh: torch.Tensor) -> None:
        """Put the recomputed tokens `index` (dim 1) into the cached output."""
        fresh = fresh.to(self.output.dtype)
        if self.owned:
            self.output.index_copy_(1, index, fresh)
        else:
            self.output, self.owned = self.output.index_copy(1, index, fresh), True

    def replace(self, output: torch.Tensor) -> torch.Tensor:
        self.output, self.owned = output, True
        return output


C = TypeVar("C", bound=CachedOutput)


@dataclass(kw_only=True)
class TokenCache(CachedOutput):
    age: torch.Tensor  # (tokens,) int64: CACHED steps since each token's value was computed
    rank: torch.Tensor  # (tokens,) tie-break rank, on the output's device
    step: int = -1  # the step of the last call
    refreshed: torch.Tensor | None = None  # tokens recomputed at `step` (None: none)


class TokenRefreshHook(ModelHook):
    """On a token-wise module: FULL step fills the cache, CACHED step recomputes a subset of tokens."""

    def __init__(self, runtime: CacheRuntime, refresh_ratio: float, score: str, tie_break: str) -> None:
        super().__init__()
        self.runtime, self.refresh_ratio = runtime, refresh_ratio
        self.score, self.tie_break = score, tie_break
        self.caches: dict[str, TokenCache] = {}

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        hidden, rest, kwargs = _split_tokens(args, kwargs)
        runtime, branch = self.runtime, self.runtime.branch
        if runtime.is_full:
            output = self.fn_ref.original_forward(hidden, *rest, **kwargs)
            self._fill(branch, hidden, output)
            return output
        cache = _cache_of(self.caches, runtime, hidden)
        num_tokens = cache.age.numel()
        cache.age += 1
        cache.step, cache.refreshed = runtime.step, None
        count = refresh_count(self.refresh_ratio, num_tokens)
        if count == 0:
            return cache.output  # FORA: the object the FULL step stored
        if count == num_tokens:  # no gather: the module's own full computation, bit for bit
            cache.age.zero_()
            cache.refreshed = torch.arange(num_tokens, device=cache.age.device)
            return cache.replace(self.fn_ref.original_forward(hidden, *rest, **kwargs))
        score = cache.age if self.score == "age" else torch.zeros_like(cache.age)
        index = refresh_indices(score, cache.rank, count)
        cache.write(index, self.fn_ref.original_forward(hidden.index_select(1, index), *rest, **kwargs))
        cache.age.index_fill_(0, index, 0)
        cache.refreshed = index
        return cache.output

    def _fill(self, branch: str, hidden: torch.Tensor, output) -> None:
        if not isinstance(output, torch.Tensor) or output.shape[:2] != hidden.shape[:2]:
            raise LbridgeError(
                f"toca: a token-wise site returned {type(output).__name__} not shaped (batch, tokens, ...) "
                "like its input: it cannot be refreshed per token"
            )
        num_tokens = hidden.shape[1]
        age = torch.zeros(num_tokens, dtype=torch.long, device=output.device)
        previous = self.caches.get(branch)
        if previous is not None and previous.rank.numel() == num_tokens:
            rank = previous.rank
        else:
            rank = tie_rank(num_tokens, self.tie_break).to(output.device)
        self.caches[branch] = TokenCache(output, age=age, rank=rank, step=self.runtime.step)

    def reset(self) -> None:
        self.caches.clear()


class ElementwiseFollowerHook(ModelHook):
    """On a module applied elementwise to a refreshed site's output (FLUX's GELU after `proj_mlp`).

    FULL step: run and keep the output. CACHED step: recompute only the tokens the site just
    refreshed; the others' values are unchanged because their input is. Exact, as the site is.
    """

    def __init__(self, runtime: CacheRuntime, site: TokenRefreshHook) -> None:
        super().__init__()
        self.runtime, self.site = runtime, site
        self.caches: dict[str, CachedOutput] = {}

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        hidden, rest, kwargs = _split_tokens(args, kwargs)
        runtime, branch = self.runtime, self.runtime.branch
        if runtime.is_full:
            output = self.fn_ref.original_forward(hidden, *rest, **kwargs)
            self.caches[branch] = CachedOutput(output)
            return output
        cache = _cache_of(self.caches, runtime, hidden)
        site = self.site.caches[branch]
        if site.step != runtime.step:
            raise RuntimeError(f"toca: an elementwise follower ran at step {runtime.step} before its site")
        index = site.refreshed
        if index is None:
            return cache.output
        if index.numel() == hidden.shape[1]:
            return cache.replace(self.fn_ref.original_forward(hidden, *rest, **kwargs))
        cache.write(index, self.fn_ref.original_forward(hidden.index_select(1, index), *rest, **kwargs))
        return cache.output

    def reset(self) -> None:
        self.caches.clear()


def _cache_of(caches: dict[str, C], runtime: CacheRuntime, hidden: torch.Tensor) -> C:
    cache = caches.get(runtime.branch)
    if cache is None:
        raise RuntimeError(f"CACHED step {runtime.step} on branch '{runtime.branch}' before any FULL step")
    if hidden.shape[:2] != cache.output.shape[:2]:
        raise RuntimeError(f"toca: input {tuple(hidden.shape)} does not match the cached tokens")
    return cache


def _split_tokens(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict]:
    """The token tensor (first positional or `hidden_states`) and the other call arguments."""
    if args:
        return args[0], args[1:], kwargs
    kwargs = dict(kwargs)
    return kwargs.pop("hidden_states"), (), kwargs


def is_attention(module: torch.nn.Module) -> bool:
    return isinstance(module, Attention | AttentionModuleMixin)


class ToCa(CacheMethod):
    name = "toca"

    def __init__(
        self,
        refresh_ratio: float = 0.1,
        score: str = "age",
        tie_break: str = "spread",
        attention: str = "reuse",
        name: str = "toca",
    ) -> None:
        super().__init__()
        if isinstance(refresh_ratio, bool) or not isinstance(refresh_ratio, int | float):
            raise LbridgeError(f"method.refresh_ratio={refresh_ratio!r} must be a number in [0, 1]")
        if not 0.0 <= refresh_ratio <= 1.0:
            raise LbridgeError(f"method.refresh_ratio={refresh_ratio!r} must be in [0, 1]")
        for key, value, accepted in (
            ("score", score, SCORES),
            ("tie_break", tie_break, TIE_BREAKS),
            ("attention", attention, ATTENTION),
        ):
            if value not in accepted:
                raise LbridgeError(f"unknown method.{key} '{value}' (accepted: {', '.join(accepted)})")
        self.refresh_ratio = float(refresh_ratio)
        self.score, self.tie_break, self.attention = score, tie_break, attention

    def install(self, transformer, adapter, runtime) -> None:
        for block in adapter.blocks(transformer):
            for module in adapter.attn_mlp_sites(block):
                if not is_attention(module):
                    hook = TokenRefreshHook(runtime, self.refresh_ratio, self.score, self.tie_break)
                    self.add_hook(module, hook, "tokens")
                    follower = adapter.elementwise_after(block, module)
                    if follower is not None:
                        self.add_hook(follower, ElementwiseFollowerHook(runtime, hook), "follower")
                elif self.attention == "reuse":
                    self.add_hook(module, ReuseOutputHook(runtime), "attention")

    def describe(self) -> dict:
        return {
            "name": self.name,
            "refresh_ratio": self.refresh_ratio,
            "score": self.score,
            "tie_break": self.tie_break,
            "attention": self.attention,
        }
