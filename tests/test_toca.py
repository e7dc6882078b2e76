"""ToCa: at a CACHED step each MLP recomputes the `refresh_ratio` fraction of tokens cached longest.

Notation of lbridge/methods/toca.py: a token's *age* is the number of steps since its cached value
was computed; a FULL step sets every age to 0, a CACHED step adds 1 to every age, then refreshes the
tokens of largest age (ties by the tie-break order) and sets their age to 0.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers.models.normalization import AdaLayerNormZero

import lbridge
from lbridge.errors import LbridgeError
from lbridge.methods import load_method, toca
from lbridge.methods.toca import (
    ChainExitHook,
    GatherReuseHook,
    NoTokensHook,
    TokenAgeBook,
    TokenRefreshHook,
    refresh_count,
    spread_order,
)
from lbridge.models.base import TokenChain, adapter_for
from lbridge.runtime.context import CacheRuntime, ManualClock
from lbridge.runtime.hooks import ReuseOutputHook, register
from lbridge.runtime.schedule import Schedule

TOKENS = 8


def hooked(schedule: str, refresh_ratio: float, tie_break: str = "raster", score: str = "age", module=None):
    steps = Schedule.parse(schedule)
    runtime = CacheRuntime(ManualClock(len(steps)), steps)
    module = module if module is not None else torch.nn.Identity()
    hook = register(module, TokenRefreshHook(runtime, refresh_ratio, score, tie_break), "test.toca")
    return runtime, module, hook


def call(runtime, module, step, x, branch="cond"):
    runtime.clock.step = step
    runtime.enter_call(branch)
    return module(x)


def tokens(step: int) -> torch.Tensor:
    """(batch 2, 8 tokens, 1 channel): token i holds 10 * step + i, so values tell which step made them."""
    return (10.0 * step + torch.arange(TOKENS, dtype=torch.float64)).expand(2, TOKENS).unsqueeze(-1)


def made_at(output: torch.Tensor) -> list[int]:
    """The step each token's value was computed at (an identity module: the value names it)."""
    return [int(v) // 10 for v in output[0, :, 0]]


def test_the_tokens_cached_longest_are_refreshed_and_their_age_resets():
    runtime, module, hook = hooked("Fccc", refresh_ratio=3 / TOKENS)
    made = []
    for step in range(4):
        made.append(made_at(call(runtime, module, step, tokens(step))))
        if step == 0:
            assert hook.ages["cond"].age.tolist() == [0] * TOKENS
    # Step 1: all ages 1 -> tokens 0-2 (raster tie-break). Step 2: ages [0,0,0,2,2,2,2,2] -> 3-5.
    # Step 3: ages [1,1,1,0,0,0,3,3] + 1 -> 6 and 7 (age 3), then token 0 (age 2, first in raster order).
    assert made[1] == [1, 1, 1, 0, 0, 0, 0, 0]
    assert made[2] == [1, 1, 1, 2, 2, 2, 0, 0]
    assert made[3] == [3, 1, 1, 2, 2, 2, 3, 3]
    assert hook.ages["cond"].age.tolist() == [0, 2, 2, 1, 1, 1, 0, 0]


def test_spread_tie_break_picks_evenly_spaced_tokens_and_cycles_through_all():
    runtime, module, hook = hooked("Fcccc", refresh_ratio=2 / TOKENS, tie_break="spread")
    refreshed = []
    previous = call(runtime, module, 0, tokens(0))
    for step in range(1, 5):
        output = call(runtime, module, step, tokens(step))
        refreshed.append([i for i in range(TOKENS) if output[0, i, 0] != previous[0, i, 0]])
        previous = output.clone()  # the cache is written in place at the next CACHED step
    assert spread_order(TOKENS).tolist() == [0, 4, 2, 6, 1, 5, 3, 7]  # van der Corput order
    assert refreshed == [[0, 4], [2, 6], [1, 5], [3, 7]]


def test_static_score_refreshes_the_same_tokens_every_cached_step():
    runtime, module, _ = hooked("Fccc", refresh_ratio=2 / TOKENS, tie_break="spread", score="static")
    outputs = [call(runtime, module, step, tokens(step)) for step in range(4)]
    assert made_at(outputs[3]) == [3, 0, 0, 0, 3, 0, 0, 0]


def test_a_full_step_recomputes_everything_and_resets_every_age():
    runtime, module, hook = hooked("FccFc", refresh_ratio=2 / TOKENS)
    outputs = [call(runtime, module, step, tokens(step)) for step in range(5)]
    assert made_at(outputs[3]) == [3] * TOKENS and made_at(outputs[4]) == [4, 4, 3, 3, 3, 3, 3, 3]
    assert hook.ages["cond"].age.tolist() == [0, 0, 1, 1, 1, 1, 1, 1]


def test_the_full_steps_output_is_never_written_to_by_later_refreshes():
    runtime, module, _ = hooked("Fccc", refresh_ratio=3 / TOKENS)
    full = call(runtime, module, 0, tokens(0))
    for step in range(1, 4):
        call(runtime, module, step, tokens(step))
    assert made_at(full) == [0] * TOKENS


def test_modules_of_one_length_share_their_ages_and_pick_once_per_step(monkeypatch):
    picks, pick = [], toca.refresh_indices
    monkeypatch.setattr(toca, "refresh_indices", lambda *args: picks.append(args) or pick(*args))
    runtime = CacheRuntime(ManualClock(4), Schedule.parse("Fccc"))
    book = TokenAgeBook("raster")
    first, second, alone = (torch.nn.Identity() for _ in range(3))
    hooks = [register(m, TokenRefreshHook(runtime, 3 / TOKENS, "age", "raster", book=b), "test.toca")
             for m, b in ((first, book), (second, book), (alone, None))]  # fmt: skip
    for step in range(4):
        runtime.clock.step = step
        runtime.enter_call("cond")
        shared = [made_at(first(tokens(step))), made_at(second(tokens(step)))]
        assert shared == [made_at(alone(tokens(step)))] * 2  # what a module picking alone picks
    assert hooks[0].ages["cond"] is hooks[1].ages["cond"]
    assert len(picks) == 2 * 3  # per CACHED step: one for the shared length, one for the module alone


class Doubler(torch.nn.Module):
    """An elementwise module that records how many tokens each call gets."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens_seen: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.tokens_seen.append(x.shape[1])
        return 2 * x


class ParallelBlock(torch.nn.Module):
    """FLUX's single-block layout: `projection(cat([attention(h), activation(mlp(h))]))`, h = norm(x)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.norm = torch.nn.LayerNorm(4)
        self.attention, self.mlp = torch.nn.Linear(4, 4), torch.nn.Linear(4, 8)
        self.activation, self.projection = Doubler(), torch.nn.Linear(12, 4)
        self.projection_tokens: list[int] = []
        self.projection.register_forward_pre_hook(
            lambda _, args: self.projection_tokens.append(args[0].shape[1])
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        mlp = self.activation(self.mlp(h))
        return self.projection(torch.cat([self.attention(h), mlp], dim=-1))


def hooked_parallel(schedule: str, refresh_ratio: float, chain: bool):
    """A ParallelBlock with ToCa's hooks: as a token chain (norm to projection on the refreshed tokens
    alone), or at the sites (the MLP refreshed per token, attention reused, the rest on every token)."""
    runtime, block = CacheRuntime(ManualClock(len(schedule)), Schedule.parse(schedule)), ParallelBlock()
    if chain:
        layout = TokenChain(block.norm, block.projection, attention=block.attention)
        entry = register(
            block.norm, TokenRefreshHook(runtime, refresh_ratio, "age", "raster", True), "test.toca"
        )
        register(block.attention, GatherReuseHook(runtime, entry, layout), "test.attention")
        register(block.projection, ChainExitHook(runtime, entry), "test.exit")
    else:
        register(block.mlp, TokenRefreshHook(runtime, refresh_ratio, "age", "raster"), "test.toca")
        register(block.attention, ReuseOutputHook(runtime), "test.attention")
    return runtime, block


@torch.no_grad()
def test_a_token_chain_runs_on_the_refreshed_tokens_alone_and_returns_what_the_sites_would():
    chain_runtime, chain = hooked_parallel("Fccc", refresh_ratio=3 / TOKENS, chain=True)
    sites_runtime, sites = hooked_parallel("Fccc", refresh_ratio=3 / TOKENS, chain=False)
    for step in range(4):
        x = torch.randn(2, TOKENS, 4)
        torch.testing.assert_close(
            call(chain_runtime, chain, step, x), call(sites_runtime, sites, step, x), rtol=1e-6, atol=1e-6
        )
    assert chain.projection_tokens == [TOKENS, 3, 3, 3] and chain.activation.tokens_seen == [TOKENS, 3, 3, 3]
    assert sites.projection_tokens == [TOKENS] * 4


@torch.no_grad()
def test_a_token_chain_refreshing_nothing_returns_its_full_steps_output():
    runtime, block = hooked_parallel("Fcc", refresh_ratio=0.0, chain=True)
    outputs = [call(runtime, block, step, torch.randn(2, TOKENS, 4)) for step in range(3)]
    assert block.projection_tokens == [TOKENS, 0, 0] and all(o is outputs[0] for o in outputs)


class Misdescribed(torch.nn.Module):
    """Its 'exit' reads the block's input, not what its 'entry' returned: not a token chain."""

    def __init__(self) -> None:
        super().__init__()
        self.entry, self.exit = torch.nn.Identity(), torch.nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.entry(x)
        return self.exit(x)


def test_a_chain_whose_exit_does_not_get_the_refreshed_tokens_is_an_error():
    runtime, block = CacheRuntime(ManualClock(2), Schedule.parse("Fc")), Misdescribed()
    entry = register(block.entry, TokenRefreshHook(runtime, 0.25, "age", "raster", True), "test.toca")
    register(block.exit, ChainExitHook(runtime, entry), "test.exit")
    call(runtime, block, 0, tokens(0))
    with pytest.raises(RuntimeError, match="exit got 8 tokens where its entry refreshed 2"):
        call(runtime, block, 1, tokens(1))


def run_bench_toca(
    config_name: str,
    chains: bool,
    dtype=torch.float32,
    modulation="per_step",
    watch=None,
    one_forward: bool = True,
    **params,
):
    """ToCa on a random-weight transformer of the bench's tiny configs: (latents, cost, hook types, loop).

    `watch(transformer)` runs before the sampling loop, after the plan's calls (to count calls).
    `one_forward=False`: the adapter as if its family had no one-forward blocks."""
    from lbridge.api import Accelerator
    from lbridge.bench.models import CONFIGS, DenoisingLoop, build_transformer

    config = CONFIGS[config_name]
    torch.manual_seed(0)
    transformer = build_transformer(config, torch.device("cpu"), dtype)
    loop = DenoisingLoop(transformer, config, torch.device("cpu"), dtype)
    adapter = adapter_for(transformer)(name="t")
    if not chains:
        adapter.token_chains = lambda block: []
    if not one_forward:
        adapter.full_step_forward = lambda block: None
    params = {"refresh_ratio": 0.25, **params}
    acc = Accelerator(loop, load_method("toca", **params), adapter, modulation)
    acc.plan(1.0, {"num_inference_steps": config.steps}, interval=4)
    acc.attach()
    if watch is not None:
        watch(transformer)
    try:
        with torch.no_grad():
            latents = loop(config.steps)
        return latents, acc.cost, [type(hook) for _, hook in acc.method._hooks], loop
    finally:
        acc.remove()


def blocks_of(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    return adapter_for(transformer)(name="t").blocks(transformer)


@pytest.mark.parametrize("config_name", ["flux-tiny", "hunyuan-tiny"])
def test_token_chains_run_norms_mlps_and_projections_on_the_refreshed_tokens_and_change_nothing(config_name):
    latents, cost, hooks, loop = run_bench_toca(config_name, chains=True)
    sites, sites_cost, site_hooks, _ = run_bench_toca(config_name, chains=False)
    double, single = len(loop.transformer.transformer_blocks), len(loop.transformer.single_transformer_blocks)
    assert hooks.count(ChainExitHook) == 2 * double + single and hooks.count(GatherReuseHook) == single
    assert hooks.count(NoTokensHook) == 2 * double  # norm1, norm1_context: only the attention reads them
    assert ChainExitHook not in site_hooks and NoTokensHook not in site_hooks
    assert not torch.equal(latents, loop.latents)
    torch.testing.assert_close(latents, sites, rtol=1e-6, atol=1e-6)
    # The single blocks' projection runs on the refreshed tokens only: fewer FLOPs, same samples.
    assert cost.full == sites_cost.full and cost.cached < sites_cost.cached


def test_a_wan_block_runs_norm3_and_its_ffn_on_the_refreshed_tokens_and_its_norms_before_attention_on_none():
    latents, cost, hooks, loop = run_bench_toca("wan-tiny", chains=True, fused_blocks=False)
    sites, sites_cost, site_hooks, _ = run_bench_toca("wan-tiny", chains=False)
    blocks = len(loop.transformer.blocks)
    assert hooks.count(ChainExitHook) == blocks and GatherReuseHook not in hooks
    assert hooks.count(NoTokensHook) == 2 * blocks  # norm1, norm2: only the reused attentions read them
    assert hooks.count(ReuseOutputHook) == 2 * blocks  # self- and cross-attention
    assert ChainExitHook not in site_hooks
    assert not torch.equal(latents, loop.latents)
    # LayerNorm and modulation act on each token alone: on the refreshed ones, the same values.
    assert torch.equal(latents, sites)
    assert cost == sites_cost  # the FFN on the same tokens; what the chain saves, FLOPs do not count


def per_token_timesteps(transformer: torch.nn.Module) -> None:
    """Wan2.2 TI2V's call: a timestep per latent token, so a (batch, tokens, 6, dim) modulation."""

    def expand(module, args, kwargs):
        latents = kwargs["hidden_states"]
        tokens = latents.shape[2] * (latents.shape[3] // 2) * (latents.shape[4] // 2)
        timestep = kwargs["timestep"][:, None].expand(-1, tokens) * torch.linspace(0.5, 1.0, tokens)
        return args, {**kwargs, "timestep": timestep}

    transformer.register_forward_pre_hook(expand, with_kwargs=True)


def test_a_wan_block_with_a_modulation_per_token_reads_that_of_its_refreshed_tokens():
    fused, _, hooks, _ = run_bench_toca("wan-tiny", chains=True, watch=per_token_timesteps)
    sites, *_ = run_bench_toca("wan-tiny", chains=False, watch=per_token_timesteps)
    per_step, *_ = run_bench_toca("wan-tiny", chains=False)
    assert toca.ReusedAttentionBlockHook in hooks
    assert not torch.equal(sites, per_step)  # the timesteps per token made a difference
    assert torch.equal(fused, sites)


def test_a_modulation_per_token_under_the_blocks_own_forward_is_refused_with_a_message():
    # That forward modulates every token while the chain hands it the refreshed ones: a shape error
    # at the first CACHED call, unless refused at the first (FULL) call.
    with pytest.raises(LbridgeError, match=r"method.fused_blocks=false .*per token.*fused_blocks=true"):
        run_bench_toca("wan-tiny", chains=True, fused_blocks=False, watch=per_token_timesteps)
    per_step, _, hooks, _ = run_bench_toca("wan-tiny", chains=True, fused_blocks=False)  # Wan2.1's: runs
    assert torch.isfinite(per_step).all() and toca.ModulationPerStepCheck in hooks
    # A family that never modulates per token gets no check (the module breakdown times its blocks).
    _, _, flux_hooks, _ = run_bench_toca("flux-tiny", chains=True, fused_blocks=False)
    assert toca.ModulationPerStepCheck not in flux_hooks


ONE_FORWARD_CASES = [
    (config_name, *case)
    for config_name in ("flux-tiny", "wan-tiny", "hunyuan-tiny")
    for case in [
        (0.25, torch.float32, "per_step"),
        (0.25, torch.bfloat16, "per_step"),
        (0.0, torch.float32, "per_step"),
        (1.0, torch.float32, "per_step"),
    ]
] + [("flux-tiny", 0.25, torch.float32, "batched")]  # Wan's adapter has no batched modulation


@pytest.mark.parametrize("config_name, refresh_ratio, dtype, modulation", ONE_FORWARD_CASES)
def test_a_block_runs_as_one_forward_at_every_step_and_samples_what_its_hooked_modules_do(
    config_name, refresh_ratio, dtype, modulation
):
    norm1_calls = []

    def watch(transformer):  # calls of the module, hooked: the one forwards never make one
        blocks_of(transformer)[0].norm1.register_forward_pre_hook(lambda *_: norm1_calls.append(1))

    options = {"refresh_ratio": refresh_ratio, "dtype": dtype, "modulation": modulation, "watch": watch}
    fused, _, hooks, loop = run_bench_toca(config_name, chains=True, **options)
    fused_norm1_calls, norm1_calls[:] = len(norm1_calls), []
    hooked, _, plain_hooks, _ = run_bench_toca(config_name, chains=True, fused_blocks=False, **options)
    assert hooks.count(toca.ReusedAttentionBlockHook) == len(blocks_of(loop.transformer))
    assert toca.ReusedAttentionBlockHook not in plain_hooks
    assert torch.equal(fused, hooked)
    # Under the hooks every transformer call runs norm1 (flux-tiny: 8 steps; wan-tiny: 6 steps of two
    # CFG calls; hunyuan-tiny: 6); the one forwards run it unhooked at FULL steps, and not at all, or
    # only its gates, at CACHED ones (it feeds the reused attention alone).
    assert (fused_norm1_calls, len(norm1_calls)) == (0, loop.config.steps * len(loop.config.branches))


@pytest.mark.parametrize(
    "index", [[], [1, 3], [5, 6, 9], [2, 4, 7], list(range(10))], ids=["none", "text", "image", "both", "all"]
)
def test_the_refreshed_tokens_gathered_from_two_streams_are_those_of_their_concatenation(index):
    """A compiled single FLUX block gathers its refreshed tokens from its text and image streams
    without writing their concatenation (`ChainAtStep.gather(*parts)`): the same values."""
    text, image, index = torch.randn(2, 4, 3), torch.randn(2, 6, 3), torch.tensor(index, dtype=torch.long)
    joined = torch.cat([text, image], dim=1)
    expected = joined.index_select(1, index)
    assert torch.equal(toca._gathered_from_parts((text, image), index), expected)
    assert torch.equal(toca._gathered_from_parts((text[:, :0], joined), index), expected)  # an empty part


def test_the_one_forward_blocks_are_those_of_the_transformer_installed_on_and_kept_across_installs():
    """Two per block, its FULL and its CACHED forward: the regions regional compile compiles for
    ToCa's blocks. A reinstall on the same transformer keeps them (and their compiled forwards),
    another transformer gets its own."""
    from lbridge.api import Accelerator
    from lbridge.bench.models import CONFIGS, DenoisingLoop, build_transformer
    from lbridge.models import flux
    from lbridge.models.base import adapter_for

    config, method = CONFIGS["flux-tiny"], load_method("toca")

    def installed_on(transformer) -> list[torch.nn.Module]:
        loop = DenoisingLoop(transformer, config, torch.device("cpu"), torch.float32)
        acc = Accelerator(loop, method, adapter_for(transformer)(name="t"), "per_step")
        acc.plan(1.0, {"num_inference_steps": config.steps})
        acc.attach()
        acc.remove()
        return method.step_modules()

    def blocks(transformer) -> list[torch.nn.Module]:
        return [*transformer.transformer_blocks, *transformer.single_transformer_blocks]

    first, second = (build_transformer(config, torch.device("cpu"), torch.float32) for _ in range(2))
    modules = installed_on(first)
    assert [m.block for m in modules] == [block for block in blocks(first) for _ in ("full", "cached")]
    assert [m.run for m in modules[:2]] == [flux.double_block_full, flux.double_block_reused]
    assert [m.run for m in modules[-2:]] == [flux.single_block_full, flux.single_block_reused]
    assert installed_on(first) == modules  # the same objects
    assert [m.block for m in installed_on(second)[::2]] == blocks(second)


def test_a_family_with_chains_but_without_one_forward_blocks_keeps_its_blocks_own():
    fused, _, _, _ = run_bench_toca("hunyuan-tiny", chains=True)
    hooked, _, hooks, _ = run_bench_toca("hunyuan-tiny", chains=True, one_forward=False)
    assert ChainExitHook in hooks and toca.ReusedAttentionBlockHook not in hooks
    assert torch.equal(hooked, fused)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_adaln_norm_on_no_tokens_gives_its_gates_without_running_the_norm(dtype):
    torch.manual_seed(0)
    norm = AdaLayerNormZero(16)
    hidden, emb = torch.randn(2, 5, 16, dtype=dtype), torch.randn(2, 16)
    with torch.no_grad():
        expected = norm(hidden[:, :0], emb=emb)
        runtime = CacheRuntime(ManualClock(2), Schedule.parse("Fc"))
        register(norm, NoTokensHook(runtime), "test.no_tokens")
        norm_calls = []
        norm.norm.register_forward_hook(lambda *_: norm_calls.append(1))
        full = call(runtime, lambda x: norm(x, emb=emb), 0, hidden)
        cached = call(runtime, lambda x: norm(x, emb=emb), 1, hidden)
    assert full[0].shape == hidden.shape and len(norm_calls) == 1  # the FULL step normed every token
    assert cached[0].shape == (2, 0, 16) and cached[0].dtype == expected[0].dtype
    for got, want in zip(cached[1:], expected[1:], strict=True):
        assert torch.equal(got, want)


def test_with_attention_recomputed_toca_refreshes_the_mlp_sites_without_chains():
    _, cost, hooks, _ = run_bench_toca("flux-tiny", chains=True, attention="recompute")
    _, reused_cost, _, _ = run_bench_toca("flux-tiny", chains=True)
    assert set(hooks) == {TokenRefreshHook} and cost.cached > reused_cost.cached


def test_each_cfg_branch_has_its_own_cache_and_ages():
    runtime, module, hook = hooked("Fc", refresh_ratio=2 / TOKENS)
    for step in range(2):
        for branch, sign in (("cond", 1.0), ("uncond", -1.0)):
            output = call(runtime, module, step, sign * tokens(step), branch)
            if step == 1:
                expected = torch.cat([tokens(1)[:, :2], tokens(0)[:, 2:]], dim=1)
                torch.testing.assert_close(output, sign * expected, rtol=0, atol=0)
    assert set(hook.ages) == {"cond", "uncond"}


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))


@torch.no_grad()
def test_refreshed_tokens_equal_the_full_mlp_on_the_current_input_and_the_rest_are_reused():
    net = mlp()
    reference = mlp()  # same weights, no hook
    runtime, module, _ = hooked("Fc", refresh_ratio=0.5, tie_break="spread", module=net)
    inputs = [torch.randn(2, TOKENS, 4) for _ in range(2)]
    full = call(runtime, module, 0, inputs[0])
    cached = call(runtime, module, 1, inputs[1])
    fresh = [0, 2, 4, 6]  # the first half of the spread order
    torch.testing.assert_close(cached[:, fresh], reference(inputs[1])[:, fresh], rtol=1e-6, atol=1e-6)
    stale = [1, 3, 5, 7]
    assert torch.equal(cached[:, stale], full[:, stale])


@torch.no_grad()
def test_refresh_ratio_1_returns_the_modules_full_computation_on_the_current_input_bit_for_bit():
    net, reference = mlp(), mlp()
    runtime, module, _ = hooked("Fc", refresh_ratio=1.0, tie_break="spread", module=net)
    call(runtime, module, 0, torch.randn(2, TOKENS, 4))
    x = torch.randn(2, TOKENS, 4)
    assert torch.equal(call(runtime, module, 1, x), reference(x))


def test_refresh_count_rounds_half_up_and_is_monotonic():
    assert [refresh_count(r, 64) for r in (0.0, 0.004, 0.1, 0.25, 1.0)] == [0, 0, 6, 16, 64]
    counts = [refresh_count(r / 100, 72) for r in range(101)]
    assert counts == sorted(counts)


def sample(adapter, pipe, seed=0) -> np.ndarray:
    kwargs = {**adapter.pipeline_kwargs(), "output_type": "np"}
    return np.asarray(pipe("a handwritten digit 3", generator=adapter.generator(seed), **kwargs).images)


def accelerated(adapter, pipe, method, ratio, interval=None, **params):
    return lbridge.accelerate(
        pipe, method, ratio, adapter=adapter, interval=interval, method_params=params, prompt="a cat",
        **adapter.pipeline_kwargs(),
    )  # fmt: skip


def run(adapter, pipe, method, ratio, interval=None, **params):
    acc = accelerated(adapter, pipe, method, ratio, interval, **params)
    try:
        return acc, sample(adapter, pipe)
    finally:
        acc.remove()


def test_refresh_ratio_0_samples_what_fora_attn_mlp_does_at_fewer_flops(tiny):
    # Bit for bit on the same schedule; cheaper, as the single blocks' projection is reused too.
    adapter, pipe = tiny
    fora, fora_image = run(adapter, pipe, "fora", 1.0, interval=3, site="attn_mlp")
    toca, toca_image = run(adapter, pipe, "toca", 1.0, interval=3, refresh_ratio=0.0)
    assert str(toca.schedule) == str(fora.schedule) and toca.schedule.num_cached > 0
    assert np.array_equal(toca_image, fora_image)
    assert toca.cost.full == fora.cost.full and toca.cost.cached < fora.cost.cached


def test_refresh_ratio_1_with_attention_recomputed_is_the_plain_pipeline_bit_for_bit(tiny):
    adapter, pipe = tiny
    plain = sample(adapter, pipe)
    acc, image = run(adapter, pipe, "toca", 1.0, interval=2, refresh_ratio=1.0, attention="recompute")
    assert acc.schedule.num_cached > 0 and acc.cost.cached == acc.cost.full  # nothing is skipped
    assert np.array_equal(image, plain)


def test_cached_step_flops_rise_with_refresh_ratio_and_the_solver_reaches_the_target(tiny):
    adapter, pipe = tiny
    fora = accelerated(adapter, pipe, "fora", 1.5, site="attn_mlp")
    fora.remove()
    costs = []
    for refresh_ratio in (0.0, 0.1, 0.25, 0.5, 1.0):
        acc = accelerated(adapter, pipe, "toca", 1.5, refresh_ratio=refresh_ratio)
        acc.remove()
        assert acc.flops_ratio >= 1.5
        costs.append(acc.cost.cached)
    assert costs[0] < fora.cost.cached  # the single blocks' projection is reused too
    assert costs == sorted(set(costs))  # strictly increasing: fewer tokens really run fewer FLOPs
    assert costs[-1] < fora.cost.full  # attention is still reused at refresh_ratio=1


def test_toca_at_ratio_2_on_the_tiny_model_differs_from_full_compute_but_stays_close(tiny):
    adapter, pipe = tiny
    plain = sample(adapter, pipe)
    acc, image = run(adapter, pipe, "toca", 2.0)
    assert acc.flops_ratio >= 2.0 and np.isfinite(image).all() and not np.array_equal(image, plain)
    assert np.abs(image - plain).mean() < 0.1


@pytest.mark.parametrize(
    "params,message",
    [
        ({"refresh_ratio": 1.5}, r"method.refresh_ratio=1.5 must be in \[0, 1\]"),
        ({"refresh_ratio": -0.1}, r"method.refresh_ratio=-0.1 must be in \[0, 1\]"),
        ({"refresh_ratio": "half"}, r"method.refresh_ratio='half' must be a number in \[0, 1\]"),
        ({"score": "attention"}, r"unknown method.score 'attention' \(accepted: age, static\)"),
        ({"tie_break": "random"}, r"unknown method.tie_break 'random' \(accepted: spread, raster\)"),
        ({"attention": "tokens"}, r"unknown method.attention 'tokens' \(accepted: reuse, recompute\)"),
        ({"fused_blocks": "yes"}, r"method.fused_blocks='yes' must be true or false"),
    ],
)
def test_bad_hyperparameters_are_a_one_line_error(params, message):
    with pytest.raises(LbridgeError, match=message) as err:
        load_method("toca", **params)
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_sample_from_the_command_line_on_the_tiny_model(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    args = ["sample", "model=tiny", "method=toca", "ratio=2", "num_prompts=2", f"output_root={tmp_path}"]
    result = subprocess.run(
        [sys.executable, "-m", "lbridge.cli", *args], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (run_dir,) = (tmp_path / "sample" / "tiny").glob("toca-*")
    records = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all((run_dir / r["file"]).exists() for r in records)
    assert "FLOPs speedup" in result.stdout


def run_with_memory(config_name: str, method: str, pattern: str, **options) -> tuple[int, int]:
    """A bench-loop run of a tiny config under `method` on the schedule `pattern` (F/c per step,
    repeated), after a warm one: the most bytes its own allocations held at once, and what the cache
    holds after it."""
    from lbridge.api import Accelerator
    from lbridge.bench.memory import cache_bytes, run_peak_bytes
    from lbridge.bench.models import CONFIGS, DenoisingLoop, build_transformer
    from lbridge.runtime.context import SchedulerClock

    config, cpu = CONFIGS[config_name], torch.device("cpu")
    loop = DenoisingLoop(build_transformer(config, cpu, torch.float32), config, cpu, torch.float32)
    acc = Accelerator(loop, load_method(method, **options), adapter_for(loop.transformer)(name="t"))
    acc.plan(1.0, {"num_inference_steps": config.steps})
    schedule = Schedule.parse((pattern * config.steps)[: config.steps])
    acc.runtime = CacheRuntime(SchedulerClock(loop.scheduler), schedule)
    acc.attach()
    try:
        if method == "toca":
            assert toca.ReusedAttentionBlockHook in [type(hook) for _, hook in acc.method._hooks]
        loop(config.steps)  # warm: what the first run alone allocates (lazy buffers) stays out
        acc.reset()  # as between samples: the measured run builds its cache afresh
        return run_peak_bytes(lambda: loop(config.steps), cpu), cache_bytes(acc)
    finally:
        acc.remove()


@pytest.mark.parametrize("config_name", ["flux-tiny", "wan-tiny", "hunyuan-tiny"])
@pytest.mark.parametrize("pattern", ["F", "Fc"])
def test_toca_costs_at_most_its_cache_beyond_full_compute(config_name, pattern):
    """What a run holds beyond full compute's is the cache and no more. A block's FULL call forgets the
    kept outputs its last CACHED call read and drops its own before it runs (held until replaced,
    the old ones stood beside the new, at the peak every block's); its forward frees each temporary
    where the block's own forward does."""
    full_peak, full_cache = run_with_memory(config_name, "none", "F")
    peak, cache = run_with_memory(config_name, "toca", pattern, refresh_ratio=0.25)
    assert peak - full_peak <= cache - full_cache
