"""ToCa (Zou et al., ICLR 2025): token-wise feature caching.

Granularity is FORA's `site=attn_mlp` (each block's attention and MLP outputs; the blocks still run
their modulation, gates and residual adds), refined by token chains (below). A FULL step runs every
module and fills, per CFG branch, each module's output cache and a per-token *cache age* (steps
since the token's cached value was computed). At a CACHED step:

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

Token chains (`ModelAdapter.token_chains`, FLUX, HunyuanVideo and Wan): with the attention reused, a
block's token-wise stretch from a norm to its MLP (`norm2 -> modulation -> ff`; Wan's after its
cross-attention, `norm3 -> modulation -> ffn`), or in a parallel
single-stream block from its norm to the output projection (`proj_out(cat([attn, act_mlp(proj_mlp)]))`,
the attention's FULL output gathered at the refreshed tokens), runs on the refreshed tokens alone:
the norm picks and gathers them, the exit scatters its output into its cache. The norms only the
reused attentions read (`ModelAdapter.attention_inputs`: `norm1`; Wan's `norm2` too) run on no
tokens. Exact against refreshing the MLP sites alone (tested), and what ToCa's own FLUX code does;
it saves the single blocks' projection FLOPs and the norms, modulation, concatenation and GELU over
every token, which FLOPs do not count. With `attention=recompute`, or without chains, the MLP
sites are refreshed.

One-forward blocks (`ModelAdapter.full_step_forward` and `reused_attention_forward`: FLUX, Wan;
`fused_blocks=True`, the default): at every step the block runs as one forward of the family's own
arithmetic, its modules called unhooked. At a FULL step it returns, beside the block's outputs,
what the hooks above keep (the attentions' outputs, the chains' exit outputs), and hands it to them;
at a CACHED step it reads what they keep and the tokens they refresh. Bit-identical to the block
under those hooks (tested); what it saves is host time, the dispatch of ~10 hooked module calls per
block (docs/design.md, "Overheads removed" (6)). Under regional compilation
(`runtime.compile=true`) each of the two forwards is a region of its own (`BlockForward`), and the
sites inside the block are not: a block is one graph at every step, as in full compute, the step's
bookkeeping (the tokens picked, the kept outputs made writable or handed over) done outside.
`fused_blocks=False` keeps the blocks' own forwards (the module breakdown times those).

Token-wise and attention modules are told apart by type: diffusers attention modules
(`Attention`, `AttentionModuleMixin`) are attention, every other site is a feed-forward acting on
tokens along dim 1 (true of every adapter's `attn_mlp_sites`). `refresh_ratio=0` samples what FORA
`site=attn_mlp` does, bit for bit, at fewer FLOPs with chains (the projection is reused too);
`refresh_ratio=1` recomputes every token-wise module on its full input.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_processor import Attention

from lbridge.calibration.trajectories import bind_block_arguments
from lbridge.errors import LbridgeError
from lbridge.methods.base import CacheMethod
from lbridge.models.base import FullStep, ReusedAttentionStep, adaln_zero_gates, modulation_alone
from lbridge.runtime.compile import BlockForward
from lbridge.runtime.context import CacheRuntime
from lbridge.runtime.hooks import ModelHook, ReuseOutputHook

if TYPE_CHECKING:
    from lbridge.models.base import ModelAdapter, TokenChain

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
        self.writable().index_copy_(1, index, fresh.to(self.output.dtype))

    def writable(self) -> torch.Tensor:
        """The output, owned (copied once after the FULL step that made it) to be written in place."""
        if not self.owned:
            self.output, self.owned = self.output.clone(), True
        return self.output

    def replace(self, output: torch.Tensor) -> torch.Tensor:
        self.output, self.owned = output, True
        return output


@dataclass
class TokenAges:
    """The per-token bookkeeping of the token-wise modules of one length, for one CFG branch."""

    age: torch.Tensor  # (tokens,) int64: CACHED steps since each token's value was computed
    rank: torch.Tensor  # (tokens,) tie-break rank, on the output's device
    step: int = -1  # the step of the last fill or refresh
    refreshed: torch.Tensor | None = None  # tokens recomputed at `step`, in increasing order

    def refresh(self, step: int, count: int, score: str) -> torch.Tensor:
        """At a new step: age every token by one, pick the `count` to recompute, reset their age."""
        if step == self.step and self.refreshed is not None:  # another module of this length picked them
            return self.refreshed
        self.step, num_tokens = step, self.age.numel()
        self.age += 1
        if count == num_tokens:
            self.refreshed = torch.arange(num_tokens, device=self.age.device)
            self.age.zero_()
        else:
            values = self.age if score == "age" else torch.zeros_like(self.age)
            self.refreshed = refresh_indices(values, self.rank, count)
            self.age.index_fill_(0, self.refreshed, 0)
        return self.refreshed


@dataclass
class TokenAgeBook:
    """Token ages shared by a method's token-wise modules, one record per (CFG branch, length).

    Modules of equal length are filled at the same FULL steps and refreshed at the same CACHED steps
    with the same count, score and tie-break, so their ages are equal at every step and they pick
    the same tokens: one record per length picks them once per step (a FLUX call's 16 picks -> 3:
    the image, text and joint lengths).
    """

    tie_break: str
    records: dict[tuple[str, int], TokenAges] = field(default_factory=dict)

    def filled(self, branch: str, num_tokens: int, step: int, device: torch.device) -> TokenAges:
        """Every age 0 at a FULL step: the record of the first module of this length to run in it."""
        ages = self.records.get((branch, num_tokens))
        if ages is not None and ages.step == step and ages.refreshed is None:
            return ages
        if ages is not None and ages.rank.device == device:
            rank = ages.rank
        else:
            rank = tie_rank(num_tokens, self.tie_break).to(device)
        ages = TokenAges(torch.zeros(num_tokens, dtype=torch.long, device=device), rank, step=step)
        self.records[(branch, num_tokens)] = ages
        return ages

    def clear(self) -> None:
        self.records.clear()


class TokenRefreshHook(ModelHook):
    """On a token-wise module: FULL step fills the cache, CACHED step recomputes a subset of tokens.

    `compact=True` (the entry of a token chain): a CACHED step returns the refreshed tokens' outputs
    alone and keeps no outputs; the chain's exit scatters them (`ChainExitHook`). Hooks given one
    `book` share their token ages (`TokenAgeBook`).
    """

    def __init__(
        self,
        runtime: CacheRuntime,
        refresh_ratio: float,
        score: str,
        tie_break: str,
        compact: bool = False,
        book: TokenAgeBook | None = None,
    ) -> None:
        super().__init__()
        self.runtime, self.refresh_ratio = runtime, refresh_ratio
        self.score, self.compact = score, compact
        self.book = book if book is not None else TokenAgeBook(tie_break)
        self.ages: dict[str, TokenAges] = {}
        self.outputs: dict[str, CachedOutput] = {}

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        hidden, run = _split_tokens(self, args, kwargs)
        runtime, branch = self.runtime, self.runtime.branch
        if runtime.is_full:
            output = run(hidden)
            self._fill(branch, hidden, output)
            return output
        index = self.refreshed(hidden)
        if self.compact:
            return run(_gathered(hidden, index))
        return _update(self.outputs[branch], index, lambda: run(_gathered(hidden, index)))

    def refreshed(self, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """At a CACHED step: the tokens (dim 1) recomputed at this step, picked once; checked
        against `hidden`, the module's input, when given."""
        runtime = self.runtime
        ages = self.ages.get(runtime.branch)
        _check_cached_call(ages, runtime, hidden)
        return ages.refresh(runtime.step, refresh_count(self.refresh_ratio, ages.age.numel()), self.score)

    def _fill(self, branch: str, hidden: torch.Tensor, output) -> None:
        tokens = output[0] if self.compact and isinstance(output, tuple) else output  # AdaLN: (x, gates)
        if not isinstance(tokens, torch.Tensor) or tokens.shape[:2] != hidden.shape[:2]:
            raise LbridgeError(
                f"toca: a token-wise site returned {type(output).__name__} not shaped (batch, tokens, ...) "
                "like its input: it cannot be refreshed per token"
            )
        self.start_ages(hidden)
        if not self.compact:
            self.outputs[branch] = CachedOutput(output)

    def start_ages(self, tokens: torch.Tensor) -> None:
        """At a FULL step: every token of `tokens` (batch, tokens, ...) computed now, so of age 0."""
        branch, step = self.runtime.branch, self.runtime.step
        self.ages[branch] = self.book.filled(branch, tokens.shape[1], step, tokens.device)

    def reset(self) -> None:
        self.ages.clear()
        self.outputs.clear()
        self.book.clear()


class ChainExitHook(ModelHook):
    """On the exit of a token chain: its input holds the tokens the chain's entry refreshed, alone.

    FULL step: run and keep the output. CACHED step: run those tokens and write them into the kept
    output, which is returned whole. Exact: the other tokens' inputs are unchanged (as the entry's
    refresh assumes), so are their outputs.
    """

    def __init__(self, runtime: CacheRuntime, entry: TokenRefreshHook) -> None:
        super().__init__()
        self.runtime, self.entry = runtime, entry
        self.outputs: dict[str, CachedOutput] = {}

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        hidden, run = _split_tokens(self, args, kwargs)
        if self.runtime.is_full:
            return self.keep(run(hidden))
        index = _refreshed_by(self.entry, self.runtime)
        if hidden.shape[1] != index.numel():
            raise RuntimeError(
                f"toca: a token chain's exit got {hidden.shape[1]} tokens where its entry refreshed "
                f"{index.numel()}: the block does not run the chain token by token"
            )
        return _update(self.outputs[self.runtime.branch], index, lambda: run(hidden))

    def keep(self, output: torch.Tensor) -> torch.Tensor:
        """At a FULL step: the output the CACHED steps write their refreshed tokens into."""
        self.outputs[self.runtime.branch] = CachedOutput(output)
        return output

    def reset(self) -> None:
        self.outputs.clear()


class GatherReuseHook(ModelHook):
    """On a parallel block's attention: CACHED step returns the FULL output at the refreshed tokens.

    It joins the token chain (`TokenChain.attention`), so the chain's exit reads the refreshed
    tokens' whole input and nothing else.
    """

    def __init__(self, runtime: CacheRuntime, entry: TokenRefreshHook, chain: TokenChain) -> None:
        super().__init__()
        self.runtime, self.entry, self.chain = runtime, entry, chain
        self.outputs: dict[str, torch.Tensor] = {}

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        if self.runtime.is_full:
            return self.keep(self.fn_ref.original_forward(*args, **kwargs))
        stored, index = self.outputs[self.runtime.branch], _refreshed_by(self.entry, self.runtime)
        return self.chain.split(_gathered(stored, index))

    def keep(self, output: Any) -> Any:
        """At a FULL step: the output, joined, to gather the refreshed tokens of at CACHED steps."""
        self.outputs[self.runtime.branch] = self.chain.join(output)
        return output

    def reset(self) -> None:
        self.outputs.clear()


class NoTokensHook(ModelHook):
    """On a module whose tokens only a reused attention reads: CACHED step runs it on no tokens.

    Its other outputs (AdaLN's gates and shifts, from the timestep alone) come out as they would.
    A diffusers `AdaLayerNormZero` given `emb` (FLUX's and HunyuanVideo's `norm1`, `norm1_context`)
    computes only its modulation: the norm, scale and shift of no tokens are 6 of its 10 operations,
    host time a CACHED step pays in every double block for nothing."""

    def __init__(self, runtime: CacheRuntime) -> None:
        super().__init__()
        self.runtime = runtime

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        hidden, run = _split_tokens(self, args, kwargs)
        if self.runtime.is_full:
            return run(hidden)
        if modulation_alone(module) and kwargs.get("emb") is not None:
            return _adaln_zero_on_no_tokens(module, hidden[:, :0], kwargs["emb"])
        return run(hidden[:, :0])


def _adaln_zero_on_no_tokens(norm: torch.nn.Module, no_tokens: torch.Tensor, emb: torch.Tensor) -> tuple:
    """`AdaLayerNormZero.forward(no_tokens, emb=emb)` as diffusers computes its outputs, norm left out."""
    gates = adaln_zero_gates(norm, emb)
    dtype = torch.promote_types(no_tokens.dtype, gates[0].dtype)  # what norm(x) * (1 + scale) gives
    return no_tokens.to(dtype), *gates


class ChainAtStep:
    """A token chain at one CACHED call of its block, run by the block's reused-attention forward
    (`ModelAdapter.reused_attention_forward`): the work of its hooks, without their dispatch.

    `prepare` does the step's bookkeeping (the tokens to refresh, the kept output made writable)
    before the forward runs, so the forward reads tensors alone: compiled, it does not guard on the
    step, and one graph serves every CACHED step of every block of its class.
    """

    def __init__(
        self, entry: TokenRefreshHook, exit_hook: ChainExitHook, attention: GatherReuseHook | None
    ) -> None:
        self.entry_hook, self.exit_hook, self.attention_hook = entry, exit_hook, attention
        self.entry = entry.fn_ref.original_forward
        self.exit_forward = exit_hook.fn_ref.original_forward
        # Set by `prepare`, before every CACHED call of the block.
        self.index: torch.Tensor | None = None  # the refreshed tokens, increasing
        self.kept: torch.Tensor | None = None  # the exit's output, every token, written in place
        self.reused: torch.Tensor | None = None  # parallel blocks: the attention's FULL output, joined

    def prepare(self) -> None:
        branch = self.entry_hook.runtime.branch
        self.index = self.entry_hook.refreshed()
        self.kept = self.exit_hook.outputs[branch].writable()
        if self.attention_hook is not None:
            self.reused = self.attention_hook.outputs[branch]

    def gather(self, *parts: torch.Tensor) -> torch.Tensor:
        """The refreshed tokens of the chain's input, given whole or as parts of it along dim 1."""
        if sum(part.shape[1] for part in parts) != self.kept.shape[1]:
            shapes = " + ".join(str(tuple(part.shape)) for part in parts)
            raise RuntimeError(f"toca: input {shapes} does not match the cached tokens")
        return _gathered(parts[0], self.index) if len(parts) == 1 else _gathered_from_parts(parts, self.index)

    def exit(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.index.numel():  # none: the kept output as it is (refresh_ratio=0 is FORA's reuse)
            self.kept.index_copy_(1, self.index, self.exit_forward(tokens).to(self.kept.dtype))
        return self.kept

    def attention(self) -> torch.Tensor:
        return _gathered(self.reused, self.index)

    def keep(self, exit_output: torch.Tensor) -> None:
        """After a FULL call run by the block's full-step forward: what the chain's hooks keep (a
        parallel block's attention output is the block hook's to hand over, as every attention's)."""
        self.entry_hook.start_ages(exit_output)  # token-wise: the exit's tokens are the entry's
        self.exit_hook.keep(exit_output)

    def forget(self) -> None:
        self.index = self.kept = self.reused = None


class ChainAtFull:
    """A token chain at a FULL call of its block, run by the block's full-step forward
    (`ModelAdapter.full_step_forward`): every token, through its modules' unhooked forwards."""

    def __init__(self, entry: TokenRefreshHook, exit_hook: ChainExitHook) -> None:
        self.entry = entry.fn_ref.original_forward
        self.exit = exit_hook.fn_ref.original_forward

    @staticmethod
    def gather(tokens: torch.Tensor) -> torch.Tensor:
        return tokens


class ModulationPerStepCheck(ModelHook):
    """Where a block runs its own forward under the chains' hooks (`method.fused_blocks=false`): a
    call whose modulation differs per token is refused with a message. That forward modulates every
    token while the chain hands it the refreshed ones only, which would fail at the first CACHED
    call with a shape error. Checked at FULL calls alone (a sample's first call is one), so
    CACHED calls pay only the hook's dispatch; only families that can modulate per token get it."""

    def __init__(self, runtime: CacheRuntime, adapter: ModelAdapter, method_name: str) -> None:
        super().__init__()
        self.runtime, self.adapter, self.method_name = runtime, adapter, method_name

    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
        if self.runtime.is_full:
            arguments = bind_block_arguments(module, args, kwargs)
            if self.adapter.modulation_per_token(module, arguments):
                raise LbridgeError(
                    f"method={self.method_name} with method.fused_blocks=false cannot run model "
                    f"'{self.adapter.name}' with a modulation per token (a timestep per latent "
                    "token, as Wan2.2 TI2V's): the block's own forward modulates every token. "
                    "Use method.fused_blocks=true (the default), whose blocks gather it."
                )
        return args, kwargs


class ReusedAttentionBlockHook(ModelHook):
    """On a block whose family has one-forward blocks: a FULL step runs its full-step forward and
    hands what it returns to the hooks on the block's modules, as they would have kept it; a CACHED
    step runs its reused-attention forward on what those hooks keep and the tokens they refresh.

    Same arithmetic as the block under those hooks (bit-identical, tested), without their dispatch:
    at FLUX.1-dev's depth on CPU, ToCa's CACHED call 13% shorter eager, half as long compiled
    (docs/design.md, "Overheads removed"); compiled, a block is one graph at every step."""

    def __init__(
        self,
        runtime: CacheRuntime,
        forwards: tuple[BlockForward, BlockForward],
        full_step: FullStep,
        attentions: list[ReuseOutputHook | GatherReuseHook],
        chains: list[tuple[TokenRefreshHook, ChainExitHook, GatherReuseHook | None]],
    ) -> None:
        super().__init__()
        self.runtime, (self.full, self.cached), self.full_step = runtime, forwards, full_step
        self.attentions = attentions  # in `full_step.attentions` order: those hooks keep their outputs
        # What a CACHED forward reads as `ReusedAttentionStep.attentions`: decided once, not per call
        # (a parallel block's gathered attention is read by its chain instead).
        self.reused = [hook for hook in attentions if isinstance(hook, ReuseOutputHook)]
        self.chains = [ChainAtStep(*hooks) for hooks in chains]  # built once: prepared at each call
        # The hooks whose kept outputs (per CFG branch) a FULL call replaces.
        self.keepers = [*attentions, *(chain.exit_hook for chain in self.chains)]

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        if self.runtime.is_full:
            # The chains still point at the outputs this call replaces: held through it, they would
            # keep every block's old outputs alive beside the new (the whole cache twice at its peak).
            # Dropped here, not after each CACHED call, so the frequent call pays nothing for it.
            for chain in self.chains:
                chain.forget()
            # This block's own kept outputs, too: nothing reads them at a FULL call, and held until
            # `keep` replaces them they stand beside the new ones for the whole block.
            branch = self.runtime.branch
            for hook in self.keepers:
                hook.outputs.pop(branch, None)
            outputs, attentions, exits = self.full(self.full_step, *args, **kwargs)
            for hook, attention in zip(self.attentions, attentions, strict=True):
                hook.keep(attention)
            for chain, exit_output in zip(self.chains, exits, strict=True):
                chain.keep(exit_output)
            return outputs
        for chain in self.chains:
            chain.prepare()
        reused = [hook.stored() for hook in self.reused]
        return self.cached(ReusedAttentionStep(reused, self.chains), *args, **kwargs)

    def reset(self) -> None:  # the chains' hooks drop the sample's outputs: so do the chains
        for chain in self.chains:
            chain.forget()


def _gathered(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The tokens `index` (dim 1); all of them: `tokens` itself, no copy."""
    return tokens if index.numel() == tokens.shape[1] else tokens.index_select(1, index)


def _gathered_from_parts(parts: tuple[torch.Tensor, ...], index: torch.Tensor) -> torch.Tensor:
    """The tokens `index` of the parts' concatenation along dim 1, each read from the part that holds
    it: selections only (the same values), and compiled, the concatenation is never written."""
    gathered, start = None, 0
    for part in (part for part in parts if part.shape[1]):  # an empty part holds no token
        local = index - start
        inside = ((local >= 0) & (local < part.shape[1])).view(1, -1, *[1] * (part.dim() - 2))
        picked = part.index_select(1, local.clamp(0, part.shape[1] - 1))
        gathered = picked if gathered is None else torch.where(inside, picked, gathered)
        start += part.shape[1]
    return gathered


def _update(cache: CachedOutput, index: torch.Tensor, fresh: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Write `fresh()`, the recomputed tokens `index`, into `cache`; return the updated output."""
    if index.numel() == cache.output.shape[1]:
        return cache.replace(fresh())
    if index.numel():  # none: the stored object itself (refresh_ratio=0 is FORA's reuse)
        cache.write(index, fresh())
    return cache.output


def _refreshed_by(site: TokenRefreshHook, runtime: CacheRuntime) -> torch.Tensor:
    ages = site.ages.get(runtime.branch)
    if ages is None or ages.step != runtime.step:
        raise RuntimeError(f"toca: a follower of a token-wise site ran at step {runtime.step} before it")
    return ages.refreshed


def _check_cached_call(ages: TokenAges | None, runtime: CacheRuntime, hidden: torch.Tensor | None) -> None:
    if ages is None:
        raise RuntimeError(f"CACHED step {runtime.step} on branch '{runtime.branch}' before any FULL step")
    if hidden is not None and hidden.shape[1] != ages.age.numel():
        raise RuntimeError(f"toca: input {tuple(hidden.shape)} does not match the cached tokens")


def _split_tokens(hook: ModelHook, args: tuple, kwargs: dict) -> tuple[torch.Tensor, Callable]:
    """The token tensor (first positional or `hidden_states`), and the module's forward on other tokens."""
    if args:
        hidden, rest = args[0], args[1:]
    else:
        kwargs = dict(kwargs)
        hidden, rest = kwargs.pop("hidden_states"), ()
    return hidden, lambda tokens: hook.fn_ref.original_forward(tokens, *rest, **kwargs)


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
        fused_blocks: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(fused_blocks, bool):
            raise LbridgeError(f"method.fused_blocks={fused_blocks!r} must be true or false")
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
        # Not in describe(): the same samples either way (bit-identical), only the host time differs.
        self.fused_blocks = fused_blocks
        self.book = TokenAgeBook(tie_break)  # one pick per step for all token-wise modules of a length
        # The one-forward blocks (FULL, CACHED) of the transformer installed on, by block; the next
        # install on the same blocks takes them over, so compiled ones keep their graphs.
        self.block_forwards: dict[int, tuple[BlockForward, BlockForward]] = {}

    def install(self, transformer, adapter, runtime) -> None:
        blocks = adapter.blocks(transformer)
        # This transformer's one-forward blocks stay, another one's go (a reused id is checked below).
        kept = self.block_forwards
        self.block_forwards = {id(b): kept[id(b)] for b in blocks if id(b) in kept}
        for block in blocks:
            chains = adapter.token_chains(block) if self.attention == "reuse" else []
            if chains:
                self._install_chains(block, chains, adapter, runtime)
                continue
            for module in adapter.attn_mlp_sites(block):
                if not is_attention(module):
                    self.add_hook(module, self._entry(runtime), "tokens")
                elif self.attention == "reuse":
                    self.add_hook(module, ReuseOutputHook(runtime), "attention")

    def _entry(self, runtime: CacheRuntime, compact: bool = False) -> TokenRefreshHook:
        return TokenRefreshHook(runtime, self.refresh_ratio, self.score, self.tie_break, compact, self.book)

    def _install_chains(self, block, chains: list[TokenChain], adapter, runtime: CacheRuntime) -> None:
        """With the attention reused, a block's token-wise stretches (norm to MLP, and in parallel
        blocks to the output projection) run on the refreshed tokens alone, and the norms that only
        feed the attention run on none: ToCa's own FLUX code does the same."""
        joined, hooks, reused, inputs = [], [], [], []
        for chain in chains:
            entry = self.add_hook(chain.entry, self._entry(runtime, compact=True), "tokens")
            exit_hook = self.add_hook(chain.exit, ChainExitHook(runtime, entry), "exit")
            gather = None
            if chain.attention is not None:
                gather = self.add_hook(chain.attention, GatherReuseHook(runtime, entry, chain), "attention")
                joined.append(chain.attention)
            hooks.append((entry, exit_hook, gather))
        for module in adapter.attn_mlp_sites(block):
            if is_attention(module) and not any(module is a for a in joined):
                reused.append(self.add_hook(module, ReuseOutputHook(runtime), "attention"))
        for module in adapter.attention_inputs(block):
            inputs.append(self.add_hook(module, NoTokensHook(runtime), "attention_input"))
        gathers = [gather for *_, gather in hooks if gather is not None]
        forwards = self._block_forwards(block, adapter) if self.fused_blocks else None
        # Only a family that can modulate per token gets the check (the module breakdown times the others').
        if not self.fused_blocks and type(adapter).overrides("modulation_per_token"):
            self.add_hook(block, ModulationPerStepCheck(runtime, adapter, self.name), "modulation_check")
        # One forward: every attention reused (FLUX's double block, Wan's), or one parallel block's.
        if forwards is not None and (len(gathers) == 1 and not reused or reused and not gathers):
            attention = reused + gathers
            full_step = FullStep(
                [hook.fn_ref.original_forward for hook in inputs],
                [hook.fn_ref.original_forward for hook in attention],
                [ChainAtFull(e, x) for e, x, _ in hooks],
            )
            block_hook = ReusedAttentionBlockHook(runtime, forwards, full_step, attention, hooks)
            self.add_hook(block, block_hook, "block")

    def _block_forwards(self, block, adapter) -> tuple[BlockForward, BlockForward] | None:
        """The block's one-forward modules (FULL, CACHED), built once per block and family forward."""
        full, cached = adapter.full_step_forward(block), adapter.reused_attention_forward(block)
        if full is None or cached is None:
            return None
        forwards = self.block_forwards.get(id(block))
        if forwards is None or [(m.block, m.run) for m in forwards] != [(block, full), (block, cached)]:
            forwards = (BlockForward(block, full), BlockForward(block, cached))
            self.block_forwards[id(block)] = forwards
        return forwards

    def step_modules(self) -> list[torch.nn.Module]:
        """The one-forward blocks' modules, FULL and CACHED (regional compilation's regions for them)."""
        return [module for forwards in self.block_forwards.values() for module in forwards]

    def describe(self) -> dict:
        return {
            "name": self.name,
            "refresh_ratio": self.refresh_ratio,
            "score": self.score,
            "tie_break": self.tie_break,
            "attention": self.attention,
        }
