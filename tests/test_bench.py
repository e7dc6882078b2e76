"""scripts/bench_speed.py on the tiny FLUX-layout config: the table's structure and its FLOPs column.

Timings are never asserted (they depend on the machine and its load); FLOPs are deterministic.
"""

import importlib.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pandas as pd
import pytest
import torch
from diffusers.models.normalization import AdaLayerNormZero, AdaLayerNormZeroSingle

from lbridge.api import Accelerator
from lbridge.bench.breakdown import module_breakdown, tracked_modules
from lbridge.bench.device import default_config, file_stem
from lbridge.bench.memory import cache_bytes, cache_watched, run_peak_bytes
from lbridge.bench.models import CONFIGS, DenoisingLoop, batches_modulation, build_transformer, with_heads
from lbridge.bench.ops import ops_per_call
from lbridge.bench.run import COLUMNS, BenchOptions, SpeedBench, method_params, speedup, time_runs
from lbridge.config import group_options
from lbridge.methods.base import load_method
from lbridge.models.base import adapter_for
from lbridge.runtime.compile import BlockForward, CompiledRegions, regions
from lbridge.runtime.context import CacheRuntime, SchedulerClock
from lbridge.runtime.hooks import ModelHook, register, remove_all
from lbridge.runtime.schedule import Schedule

ROOT = Path(__file__).resolve().parents[1]
METHODS = "fora,taylorseer,toca,teacache,learnibridge"
# The files a run on flux-tiny writes unless named: the device, then the config (not the default).
BENCH, PROFILE = "cpu-flux-tiny", "cpu-flux-tiny-cached-step"


def load_script(name: str = "bench_speed"):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    out = tmp_path_factory.mktemp("speed")
    args = ["--device", "cpu", "--config", "flux-tiny", "--methods", METHODS, "--ratios", "2,3",
            "--repeats", "1", "--compile-backend", "eager", "--compile-methods", "fora,toca,learnibridge",
            "--calib-prompts", "1", "--calib-steps", "2", "--out", str(out)]  # fmt: skip
    load_script().main(args)
    return out


def planned(
    name: str,
    loop: DenoisingLoop | None = None,
    modulation: str = "per_step",
    config_name: str = "flux-tiny",
    **params,
):
    config = CONFIGS[config_name] if loop is None else loop.config
    if loop is None:
        transformer = build_transformer(config, torch.device("cpu"), torch.float32)
        loop = DenoisingLoop(transformer, config, torch.device("cpu"), torch.float32)
    method = load_method(name, **{**method_params(name, config.steps), **params})
    acc = Accelerator(loop, method, adapter_for(loop.transformer)(name="t"), modulation)
    acc.plan(1.0, {"num_inference_steps": config.steps})
    return acc, loop


def test_the_loop_never_searches_the_schedule_for_its_step(monkeypatch):
    # index_for_timestep is a nonzero() over the timesteps: on CUDA a host sync in every run.
    _, loop = planned("none")
    searched = []
    monkeypatch.setattr(loop.scheduler, "index_for_timestep", lambda *a, **k: searched.append(a) or 0)
    loop(CONFIGS["flux-tiny"].steps)
    assert searched == []


def test_ops_are_counted_per_call_of_the_module_and_not_outside_it():
    class Stack(torch.nn.Module):
        def forward(self, x: torch.Tensor, depth: int) -> torch.Tensor:
            for _ in range(depth):
                x = x * 2 + 1  # two ops a layer
            return x

    stack, x = Stack(), torch.ones(3)

    def run() -> None:
        stack(x, 4)
        x.sin()  # between calls: not any call's
        stack(x, 1)

    assert ops_per_call(stack, run) == [8, 2]


def test_a_config_other_than_the_devices_default_writes_files_of_its_own_name():
    """So a run of another config (`--config wan-medium`) never overwrites results/speed/cpu.csv."""
    cpu = torch.device("cpu")
    assert default_config(cpu) == "flux-medium" and default_config(torch.device("cuda")) == "flux-dev"
    assert file_stem(cpu) == file_stem(cpu, "flux-medium") == "cpu"
    assert file_stem(cpu, "wan-medium") == "cpu-wan-medium"


def test_files_say_how_they_were_made(table):
    csv = (table / f"{BENCH}.csv").read_text()
    for key in ("# command: python scripts/bench_speed.py", "# device:", "# torch", "load average"):
        assert key in csv
    assert "| method" in (table / f"{BENCH}.md").read_text()


def test_columns_and_rows(table):
    frame = pd.read_csv(table / f"{BENCH}.csv", comment="#")
    assert set(frame.columns) <= set(COLUMNS)
    for column in ("method", "ratio_target", "mode", "flops_speedup", "latency_speedup", "efficiency",
                   "reference_s", "cache_mb", "calibrate_s", "graphs", "recompiles"):  # fmt: skip
        assert column in frame.columns
    eager = frame[frame["mode"] == "eager"]
    assert set(eager["method"]) == {"none", *METHODS.split(",")}
    compiled = frame[frame["mode"] == "compiled"]
    assert set(compiled["method"]) == {"none", "fora", "toca", "learnibridge"}
    regions = compiled.dropna(subset=["regions"]).groupby("method")["regions"].agg(set).to_dict()
    blocks = 3  # flux-tiny: 1 double + 2 single blocks
    assert regions["none"] == regions["fora"] == {blocks}
    assert regions["learnibridge"] == {blocks + 1}  # and its bridge
    assert min(regions["toca"]) > blocks  # the sites inside the blocks
    timed = frame.dropna(subset=["latency_speedup"])
    assert (timed["efficiency"] - timed["latency_speedup"] / timed["flops_speedup"]).abs().max() < 1e-3
    assert (eager[eager["method"] == "learnibridge"]["calibrate_s"].dropna() > 0).any()
    assert frame[frame["method"] == "none"]["flops_speedup"].eq(1.0).all()


def test_every_row_reports_the_memory_its_run_adds_which_holds_at_least_the_cache_it_builds(table):
    frame = pd.read_csv(table / f"{BENCH}.csv", comment="#").dropna(subset=["latency_speedup"])
    assert frame["run_peak_mb"].notna().all() and (frame["run_peak_mb"] > 0).all()
    assert (frame["run_peak_mb"] >= frame["cache_mb"]).all()  # the cache is built during the run
    assert "peak_mem_gb" not in frame.columns  # CUDA's allocator counter: no CPU figure pretends to be it


def test_a_runs_peak_is_the_most_its_own_allocations_hold_at_once_not_their_sum():
    before = [torch.empty(4 * 2**20)]  # 16 MiB from before the run: freeing it frees nothing counted
    mib = 2**20 // 4  # float32 elements in 1 MiB

    def run():
        before.clear()
        kept = torch.empty(4 * mib)
        passing = torch.empty(8 * mib)
        del passing
        return kept, torch.empty(4 * mib)  # 8 MiB held now: the peak stays 12 MiB

    assert run_peak_bytes(run, torch.device("cpu")) == 12 * 2**20


@pytest.mark.parametrize("method", ["fora", "taylorseer", "teacache"])
def test_flops_speedup_is_the_schedule_ratio(table, method):
    """flops_speedup is lbridge's count, as `lbridge sample` reports it: full-compute FLOPs over the
    method's calls as they ran (its FULL calls may cost more than a plain one: TeaCache's probe)."""
    frame = pd.read_csv(table / f"{BENCH}.csv", comment="#")
    acc, _ = planned(method)
    full, _ = planned("none")
    rows = frame[(frame["method"] == method) & (frame["mode"] == "eager")].dropna(subset=["schedule"])
    assert len(rows) > 0
    for _, row in rows.iterrows():
        schedule = Schedule.parse(row["schedule"])
        flops = schedule.num_full * acc.cost.full + schedule.num_cached * acc.cost.cached
        assert row["flops_speedup"] == pytest.approx(len(schedule) * full.cost.full / flops, rel=1e-3)
        assert row["flops_speedup"] >= row["ratio_target"] - 1e-6


def test_cached_steps_never_recompile(table):
    """Nor does swapping full compute's compiled blocks and a method's compiled regions run by run
    (ToCa compiles the sites inside the blocks): the timed rounds build no graph."""
    frame = pd.read_csv(table / f"{BENCH}.csv", comment="#")
    compiled = frame[frame["mode"] == "compiled"].dropna(subset=["recompiles"])
    assert len(compiled) > 0
    assert (compiled["recompiles"] == 0).all()
    assert (compiled["graph_breaks"] == 0).all()


GRAPH_RUNS: list[int] = []


def counted_graphs(graph: torch.fx.GraphModule, inputs: list) -> Callable:
    """A dynamo backend that runs its graphs as they are (like `eager`) and counts the runs. One
    function for every test: dynamo keeps one cache entry per backend (8 per code object at most)."""
    return lambda *args: GRAPH_RUNS.append(1) or graph.forward(*args)


def assert_compiled_replays_eager(acc: Accelerator, loop: DenoisingLoop) -> None:
    """Compiled, the accelerator's sample builds its graphs at a warm-up run and none in the next,
    breaks none, runs a graph for every block of each FULL call, and computes the eager latents bit
    for bit (the graphs run as they are: `counted_graphs`)."""
    steps = loop.config.steps
    with CompiledRegions(acc, False).installed():
        eager = loop(steps).clone()
    compiled = CompiledRegions(acc, True, backend=counted_graphs)
    with compiled.installed():
        compiled.stats.mark_warm(lambda: (acc.reset(), loop(steps)))
        GRAPH_RUNS.clear()
        acc.reset()
        latents = loop(steps)
    compiled.stats.mark_timed()
    assert compiled.stats.row()["recompiles"] == 0
    assert compiled.stats.row()["graph_breaks"] == 0
    full_calls = str(acc.runtime.schedule).count("F")
    assert len(GRAPH_RUNS) >= full_calls * len(acc.adapter.blocks(acc.transformer))
    assert torch.equal(latents, eager)


@pytest.mark.parametrize("config", ["flux-tiny", "wan-tiny", "hunyuan-tiny"])
@pytest.mark.parametrize("name", group_options("method"))
def test_every_method_runs_compiled_as_it_runs_eager_without_recompiling_or_breaking_a_graph(name, config):
    """Regional compile under the hooks serves every method on every family the bench builds, not
    only those it times compiled. Every block is compiled, or the hooked sites inside it (a hook
    outside the blocks, the rotary embedding's, changes nothing), or the forwards a method runs it
    with (`BlockForward`); the graphs built at the warm-up run are all the timed run replays; and (a
    backend that runs dynamo's graphs as they are) they compute the eager latents bit for bit."""
    acc, loop = planned(name, config_name=config)
    steps = loop.config.steps
    acc.plan(1.5, {"num_inference_steps": steps})  # every method reaches it (hunyuan-tiny's fbcache: 1.99x)
    assert "c" in str(acc.runtime.schedule) or name == "none"
    found = regions(acc)
    run_whole = {id(region.block) for region in found if isinstance(region, BlockForward)}
    for block in acc.adapter.blocks(acc.transformer):
        inside = any(region is module for region in found for module in block.modules())
        assert inside or id(block) in run_whole
    assert_compiled_replays_eager(acc, loop)


@pytest.mark.parametrize("config", ["flux-tiny", "wan-tiny", "hunyuan-tiny"])
def test_a_toca_call_runs_each_one_forward_block_as_one_compiled_graph_at_every_step(config):
    """ToCa's one-forward blocks (`BlockForward`) are regions of their own, and their sites are not:
    at a FULL call a block is one graph, as in full compute, its outputs kept after it; at a CACHED
    call too, its chains' modules and cache writes inside it. The step's bookkeeping (the tokens
    picked, the kept outputs) runs outside, so the graphs do not guard on the step."""
    acc, loop = planned("toca", config_name=config)
    steps = loop.config.steps
    acc.plan(3.0, {"num_inference_steps": steps})
    schedule = str(acc.runtime.schedule)
    assert schedule.count("c") >= 2
    blocks = acc.adapter.blocks(acc.transformer)
    compiled = CompiledRegions(acc, True, backend=counted_graphs)
    one_forward = acc.method.step_modules()
    assert len(one_forward) == 2 * len(blocks)
    assert [id(m) for m in regions(acc)] == [id(m) for m in one_forward]
    per_call: list[int] = []  # graph runs in each transformer call
    start = loop.transformer.register_forward_pre_hook(lambda *_: per_call.append(-len(GRAPH_RUNS)))
    end = loop.transformer.register_forward_hook(lambda *_: per_call.append(per_call.pop() + len(GRAPH_RUNS)))
    try:
        with compiled.installed():
            compiled.stats.mark_warm(lambda: (acc.reset(), loop(steps)))
            GRAPH_RUNS.clear()
            per_call.clear()
            acc.reset()
            loop(steps)
    finally:
        start.remove()
        end.remove()
    compiled.stats.mark_timed()
    assert compiled.stats.row()["recompiles"] == 0
    assert compiled.stats.row()["graph_breaks"] == 0
    calls = len(schedule) * len(loop.config.branches)  # wan-tiny: two CFG calls a step
    assert per_call == [len(blocks)] * calls


@pytest.mark.parametrize("config", ["wan-tiny", "hunyuan-tiny"])
def test_toca_on_the_video_families_runs_compiled_as_it_runs_eager(config):
    """Their one-forward blocks (Wan's: both attentions reused, the FFN chain on the refreshed tokens;
    HunyuanVideo's: FLUX's layout, image stream first) compiled, as every method on FLUX above."""
    acc, loop = planned("toca", config_name=config)
    acc.plan(2.0, {"num_inference_steps": loop.config.steps})
    assert all(isinstance(region, BlockForward) for region in regions(acc))
    assert_compiled_replays_eager(acc, loop)


def test_toca_with_its_blocks_unfused_compiles_the_sites_it_hooks_inside_them():
    """`fused_blocks=false`: no one-forward blocks, so the regions are the hooked modules of every
    block (double: the attention, norm1 and norm1_context, each chain's norm and MLP; single: the
    attention, the chain's norm and output projection)."""
    acc, loop = planned("toca", fused_blocks=False)
    found = regions(acc)
    double, single = len(loop.transformer.transformer_blocks), len(loop.transformer.single_transformer_blocks)
    assert len(found) == 7 * double + 3 * single
    assert not any(isinstance(region, BlockForward) for region in found)
    blocks = acc.adapter.blocks(acc.transformer)
    assert all(any(region is m for b in blocks for m in b.modules() if m is not b) for region in found)


@pytest.mark.parametrize("config", ["wan-tiny", "hunyuan-tiny"])
def test_a_block_level_method_compiles_every_block_of_the_video_families_too(config):
    """Their rotary embedding's hook sits outside the blocks, as FLUX's does: the blocks are the regions."""
    acc, loop = planned("fora", config_name=config)
    acc.plan(2.0, {"num_inference_steps": loop.config.steps})
    assert [id(m) for m in regions(acc)] == [id(b) for b in acc.adapter.blocks(acc.transformer)]


@pytest.mark.parametrize(
    "name, outputs",
    [("fora", 1), ("l2p", 3), ("tcc", 1)],
    ids=["fora-the-last", "l2p-its-history-in-a-deque", "tcc-its-base-methods"],
)
def test_cache_bytes_counts_what_the_hooks_hold(name, outputs):
    acc, loop = planned(name)
    acc.attach()
    assert cache_bytes(acc) == 0
    loop(CONFIGS["flux-tiny"].steps)
    held = cache_bytes(acc)
    acc.remove()
    tokens, transformer = 16 + 8, loop.transformer  # image + text, batch 1, float32
    final = tokens * transformer.inner_dim * 4  # site=stack: the final block's output, kept per FULL step
    rotary = 2 * tokens * sum(transformer.config.axes_dims_rope) * 4  # cos and sin of every token
    assert outputs * final + rotary <= held <= (outputs + 1) * final + rotary


def test_the_cache_is_watched_after_every_call_as_a_method_may_drop_it_when_the_sample_ends():
    """diffusers' MagCache drops its residual when the sample's last step is done: after the run its
    hooks hold none of it, while after each call they held one per CFG branch."""
    acc, loop = planned("magcache", config_name="wan-tiny")
    acc.attach()
    with cache_watched(acc) as watch:
        loop(loop.config.steps)
    after = cache_bytes(acc)
    acc.remove()
    _, frames, height, width = loop.config.latent
    tokens = frames * (height // 2) * (width // 2)  # patch (1, 2, 2)
    residual = (
        tokens * loop.transformer.config.num_attention_heads * loop.transformer.config.attention_head_dim * 4
    )
    assert watch.most >= after + len(loop.config.branches) * residual


class AfterEachCall(ModelHook):
    """Registered last on the transformer, so outermost: `check()` runs when each call is done."""

    def __init__(self, check) -> None:
        super().__init__()
        self.check = check

    def post_forward(self, module, output):
        self.check()
        return output


def test_magcache_keeps_no_first_block_input_between_calls():
    """diffusers' head hook keeps the first block's input for the tail's residual, and kept it until
    the branch's next call: one token tensor per CFG branch beside the cache. lbridge drops it."""
    acc, loop = planned("magcache", config_name="wan-tiny")
    acc.attach()
    states = acc.method.states._state_cache
    kept = []
    register(
        acc.transformer, AfterEachCall(lambda: kept.extend(s.head_block_input for s in states.values())), "t"
    )
    try:
        loop(loop.config.steps)
    finally:
        remove_all(acc.transformer, ["t"])
        acc.remove()
    assert len(kept) >= 2 * loop.config.steps and all(held is None for held in kept)


def test_cache_bytes_counts_the_batched_modulation_tables_full_compute_included():
    acc, loop = planned("none", modulation="batched")
    steps = CONFIGS["flux-tiny"].steps
    adaln = AdaLayerNormZero | AdaLayerNormZeroSingle
    widths = [m.linear.out_features for m in loop.transformer.modules() if isinstance(m, adaln)]
    # Every modulation's output and the embedding, for every step (batch 1, float32).
    tables = steps * 4 * (sum(widths) + loop.transformer.inner_dim)
    tables += 2 * (16 + 8) * sum(loop.transformer.config.axes_dims_rope) * 4  # and the rotary embedding
    acc.attach()
    loop(steps)
    held = cache_bytes(acc)
    acc.remove()
    assert tables <= held <= tables + 4096  # and the timesteps and the device-side check's flags


def test_compiled_regions_are_installed_only_while_their_method_is():
    acc, _ = planned("fora")
    blocks = acc.adapter.blocks(acc.transformer)
    contender = CompiledRegions(acc, True, backend="eager")
    assert not any("forward" in b.__dict__ for b in blocks)
    with contender.installed():
        assert acc.attached and all("forward" in b.__dict__ for b in blocks)
    assert not acc.attached and not any("forward" in b.__dict__ for b in blocks)


def test_paired_timing_alternates_full_compute_and_the_method_run_by_run(monkeypatch):
    acc, loop = planned("fora")
    full, _ = planned("none", loop)
    steps = loop.config.steps
    acc.runtime = CacheRuntime(SchedulerClock(loop.scheduler), Schedule.parse("F" + "c" * (steps - 1)))
    order = []
    for name, each in (("full", full), ("fora", acc)):
        attach = each.attach
        monkeypatch.setattr(each, "attach", lambda attach=attach, name=name: order.append(name) or attach())
    contenders = [CompiledRegions(full, False), CompiledRegions(acc, False)]
    reference, method = time_runs(contenders, loop, steps, repeats=2, warmup=0, measure_last=False)
    assert order == ["full", "fora", "full", "fora"]
    assert len(reference.seconds) == len(method.seconds) == 2
    assert set(reference.realised) == {"F"} and "c" in method.realised
    assert reference.flops > method.flops
    assert not acc.attached and not full.attached


def test_a_speedup_compares_the_fastest_runs_so_a_slowed_run_does_not_move_it():
    reference, method = [1.0, 1.0, 1.0], [0.5, 0.5, 0.5]  # a method twice as fast as full compute
    assert speedup(reference, method) == 2.0
    assert speedup([1.0, 1.4, 1.0], [0.5, 0.5, 0.9]) == 2.0  # one run of each slowed by another job


def test_learnibridges_cached_step_module_is_a_compiled_region_whatever_the_planned_schedule():
    acc, _ = planned("learnibridge")  # ratio 1, as the bench plans: no CACHED step, no adapter yet
    found = regions(acc)
    (bridge,) = acc.method.step_modules()
    assert any(module is bridge for module in found)
    assert not any(module is bridge for module in acc.adapter.blocks(acc.transformer))


@pytest.mark.parametrize("config", ["wan-tiny", "hunyuan-tiny"])
def test_video_families_run_the_same_bench(config):
    """The Wan (CFG: two branches per step) and HunyuanVideo loops run a method's schedule as planned."""
    cfg = CONFIGS[config]
    transformer = build_transformer(cfg, torch.device("cpu"), torch.float32)
    adapter = adapter_for(transformer)(name=config, device="cpu")
    bench = SpeedBench(cfg, transformer, adapter, torch.device("cpu"), torch.float32,
                       BenchOptions(ratios=(2,), repeats=1, warmup_runs=0))  # fmt: skip
    rows = bench.run(["fora"])
    fora = next(r for r in rows if r["method"] == "fora")
    assert fora["flops_speedup"] >= 2.0 and "c" in fora["schedule"]
    assert fora["cache_mb"] > 0


COMPILED = ["--compile", "--compile-backend", "eager"]


@pytest.mark.parametrize("compiled", [[], COMPILED], ids=["eager", "compiled"])
def test_the_cached_step_profile_writes_one_row_per_method(tmp_path, monkeypatch, compiled):
    args = ["--config", "flux-tiny", "--methods", "fora,learnibridge", "--runs", "1", "--out", str(tmp_path)]
    monkeypatch.setattr("sys.argv", ["profile_cached_step.py", *args, *compiled])
    load_script("profile_cached_step").main()
    stem = PROFILE + ("-compiled" if compiled else "")
    csv = tmp_path / f"{stem}.csv"
    command = "python scripts/profile_cached_step.py --config flux-tiny"
    assert csv.read_text().startswith(f"# regenerate: {command}")
    table = pd.read_csv(csv, comment="#")
    assert table["method"].tolist() == ["fora", "learnibridge"]
    recomputed = table["cached_ms"] / table["flops_share_ms"]  # from 4-decimal csv values
    assert ((table["ratio"] - recomputed).abs() / recomputed).max() < 1e-2
    assert table["cached_host_ms"].isna().all()  # CUDA only: on CPU the host's time is the call's
    # Each method's own FULL call beside full compute's: it runs every block, its CACHED call few.
    assert (table["method_full_ms"] > table["cached_ms"]).all()
    if compiled:  # a compiled region's ATen operations are not what it launches: not counted
        assert "cached_ops" not in table
    else:  # FORA's CACHED call runs the embeddings and the head; LearniBridge's its bridge as well
        fora, bridge = table.set_index("method").loc[["fora", "learnibridge"], "cached_ops"]
        assert fora < bridge < table["full_ops"].min()
    assert f"command: `{command}" in (tmp_path / f"{stem}.md").read_text()


def run_profile(monkeypatch, *args: str) -> None:
    """scripts/profile_cached_step.py in this process, on flux-tiny, one run per side, then `args`."""
    monkeypatch.setattr("sys.argv", ["profile_cached_step.py", "--config", "flux-tiny", "--runs", "1", *args])
    load_script("profile_cached_step").main()


def test_a_width_sweep_profiles_the_config_at_each_head_count_in_one_table(tmp_path, monkeypatch):
    run_profile(monkeypatch, "--heads", "2,4", "--methods", "fora", "--gemms", "--out", str(tmp_path))
    table = pd.read_csv(tmp_path / f"{PROFILE}-width.csv", comment="#")
    assert table[["dim", "method"]].values.tolist() == [[32, "fora"], [64, "fora"]]  # 16-wide heads
    products = pd.read_csv(tmp_path / f"{PROFILE}-width-gemms.csv", comment="#")
    assert sorted(products["dim"].unique()) == [32, 64]
    for dim in (32, 64):  # each width's own products: its single blocks' MLP, dim -> 4 dim on 24 tokens
        assert f"24 x {dim} x {4 * dim}" in set(products.loc[products["dim"] == dim, "product"])
    widened = with_heads(CONFIGS["flux-tiny"], 4)
    assert widened.transformer == {**CONFIGS["flux-tiny"].transformer, "num_attention_heads": 4}
    assert build_transformer(widened, torch.device("cpu"), torch.float32).inner_dim == 64


def gpu_run_command(part: str, *args: str, tmp_path: Path, config: str = "flux-tiny") -> dict:
    """scripts/gpu_run.sh (docs/gpu.md) on this CPU at flux-tiny size, writing under `tmp_path`."""
    # KIT empty: the installed packages, whatever a local `make gpu-kit` left (or is rebuilding) in
    # the checkout's .gpu-kit.
    env = {**os.environ, "PYTHON": sys.executable, "DEVICE": "cpu", "CONFIG": config,
           "COMPILE_BACKEND": "eager", "OUT": str(tmp_path / "out"),
           "RESULTS": str(tmp_path / "results"), "MIRROR_S": "1", "KIT": ""}  # fmt: skip
    return {"args": ["bash", str(ROOT / "scripts" / "gpu_run.sh"), part, *args], "cwd": ROOT, "env": env}


def gpu_run(part: str, *args: str, tmp_path: Path, config: str = "flux-tiny") -> subprocess.CompletedProcess:
    command = gpu_run_command(part, *args, tmp_path=tmp_path, config=config)
    return subprocess.run(**command, capture_output=True, text=True)


@pytest.mark.parametrize(
    "part, args, written",
    [
        (
            "check",
            ["--compile-backend", "eager"],
            [
                f"{BENCH}-check{kind}.{ext}"
                for kind in ("", "-profile", "-profile-gemms")
                for ext in ("csv", "md")
            ],
        ),
        (
            "profile",
            ["--methods", "fora", "--runs", "1"],
            [
                f"{PROFILE}{kind}.{ext}"
                for kind in ("", "-gemms", "-batched-modulation", "-modules")
                for ext in ("csv", "md")
            ],
        ),
    ],
)
def test_a_gpu_part_runs_its_script_and_hands_back_what_it_wrote(tmp_path, part, args, written):
    done = gpu_run(part, *args, tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(written)
    if part == "check":  # and the command line, compiled (the sample's own outputs stay out of OUT)
        assert "0 built during the timed generations, 0 graph breaks (toca)" in done.stdout


@pytest.mark.parametrize(
    ("config", "batches"), [("flux-tiny", True), ("hunyuan-tiny", True), ("wan-tiny", False)]
)
def test_modulation_is_batched_for_the_families_with_a_step_embedding(config, batches):
    assert batches_modulation(CONFIGS[config]) is batches


def test_the_profile_part_skips_batched_modulation_where_the_family_has_none(tmp_path):
    """Wan computes its modulation once per call outside the blocks: `CONFIG=wan21-1.3b`'s profile
    part says so and goes on to the module breakdown, instead of stopping at the refusal."""
    done = gpu_run("profile", "--methods", "fora", "--runs", "1", tmp_path=tmp_path, config="wan-tiny")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "modulation=batched: not for wan-tiny" in done.stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        f"cpu-wan-tiny-cached-step{kind}.{ext}"
        for kind in ("", "-gemms", "-modules")
        for ext in ("csv", "md")
    )


def test_the_bridge_part_times_learnibridge_and_its_fit_alone(tmp_path):
    args = ["--ratios", "2", "--repeats", "1", "--calib-prompts", "1", "--calib-steps", "2"]
    done = gpu_run("bridge", *args, tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    table = pd.read_csv(tmp_path / "out" / f"{BENCH}-bridge.csv", comment="#")
    assert table["method"].tolist() == ["none", "learnibridge"]
    assert table.loc[1, "calibrate_s"] > 0


def test_the_essential_part_fits_the_headline_rows_and_the_bridge_fit_in_one_call(tmp_path):
    """docs/gpu.md: the one call a 15-minute device budget affords, its rows in order of priority."""
    args = ["--steps", "8", "--ratios", "2", "--repeats", "1", "--calib-prompts", "1", "--calib-steps", "2",
            "--compile-backend", "eager"]  # fmt: skip
    done = gpu_run("essential", *args, tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{BENCH}-essential{kind}.{ext}" for kind in ("", "-bridge") for ext in ("csv", "md")
    )
    headline = pd.read_csv(out / f"{BENCH}-essential.csv", comment="#")
    assert list(zip(headline["method"], headline["mode"], strict=True)) == [
        ("none", "eager"), ("fora", "eager"), ("toca", "eager"), ("teacache", "eager"),
        ("none", "compiled"), ("fora", "compiled"),
    ]  # fmt: skip
    assert (headline.loc[headline["mode"] == "compiled", ["recompiles", "graph_breaks"]] == 0).all().all()
    bridge = pd.read_csv(out / f"{BENCH}-essential-bridge.csv", comment="#")
    assert bridge["method"].tolist() == ["none", "learnibridge"]
    assert bridge.loc[1, "calibrate_s"] > 0


def test_a_gpu_part_killed_at_its_time_limit_still_hands_back_the_rows_written_so_far(tmp_path):
    # The device tool kills a command at its limit and brings back only what $OUT holds by then.
    command = gpu_run_command("stack", "--repeats", "2", tmp_path=tmp_path)
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    run = subprocess.Popen(**command, **quiet, start_new_session=True)
    handed_back, deadline = tmp_path / "out" / f"{BENCH}-stack.csv", time.monotonic() + 300
    try:
        while not handed_back.exists() and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert run.poll() is None, "the part ended before anything was handed back while it ran"
    finally:
        os.killpg(run.pid, signal.SIGKILL)
        run.wait()
    rows = pd.read_csv(handed_back, comment="#")
    assert rows["method"].iloc[0] == "none"
    assert len(rows) < 1 + 5 * 5  # cut short: not every method's five ratios
    for copy in (tmp_path / "out").glob("[!.]*"):  # under its own name, a copy is a whole file
        assert copy.read_text().endswith("\n") and "none" in copy.read_text()


@pytest.mark.parametrize(
    "make_folder, message",
    [
        (True, "holds no wheels: run 'make gpu-kit'"),
        (False, "is not a folder: give the folder 'make gpu-kit' fills"),
    ],
)
def test_a_gpu_kit_without_wheels_is_refused_naming_it_before_anything_runs(tmp_path, make_folder, message):
    if make_folder:
        (tmp_path / "kit").mkdir()
    command = gpu_run_command("check", tmp_path=tmp_path)
    command["env"]["KIT"] = str(tmp_path / "kit")
    done = subprocess.run(**command, capture_output=True, text=True)
    assert done.returncode == 2
    assert f"KIT={tmp_path / 'kit'} {message}" in done.stderr
    assert not (tmp_path / "out").exists()


def test_an_unknown_gpu_part_is_refused_naming_the_accepted_ones(tmp_path):
    done = gpu_run("stacks", tmp_path=tmp_path)
    assert done.returncode == 2
    assert "unknown part 'stacks' (accepted: essential, check, stack, others, bridge, compiled, profile" in (
        done.stderr
    )


@pytest.mark.parametrize("heads", ["4,x", "0", ""])
def test_a_width_sweep_refuses_a_head_count_list_it_cannot_read_in_one_line(monkeypatch, capsys, heads):
    monkeypatch.setattr("sys.argv", ["profile_cached_step.py", "--heads", heads])
    with pytest.raises(SystemExit):
        load_script("profile_cached_step").main()
    assert f"argument --heads: '{heads}' is not a comma-separated list of positive head counts" in (
        capsys.readouterr().err
    )


def test_a_method_with_a_parameter_overridden_is_profiled_beside_the_default(monkeypatch, tmp_path):
    run_profile(monkeypatch, "--methods", "toca,toca:fused_blocks=false", "--out", str(tmp_path))
    table = pd.read_csv(tmp_path / f"{PROFILE}.csv", comment="#")
    assert table["method"].tolist() == ["toca", "toca:fused_blocks=false"]
    # The same work either way: the one-forward blocks dispatch no more operations than the hooked ones.
    assert table["cached_ops"].iloc[0] <= table["cached_ops"].iloc[1]
    script = load_script("profile_cached_step")
    assert script.method_spec("toca:fused_blocks=false:refresh_ratio=0.2") == (
        "toca",
        {"fused_blocks": False, "refresh_ratio": 0.2},
    )
    with pytest.raises(SystemExit, match="'toca:fused' is not METHOD or METHOD:KEY=VALUE"):
        script.method_spec("toca:fused")


@pytest.mark.parametrize(
    "methods, message",
    [
        ("fora,toca:bogus=1", "ToCa.__init__() got an unexpected keyword argument 'bogus'"),
        ("nosuch", "unknown method 'nosuch' (accepted: fbcache"),
        ("toca:fused_blocks=maybe", "method.fused_blocks='maybe' must be true or false"),
    ],
)
def test_a_bad_method_or_parameter_is_refused_in_one_line_before_any_timing(
    monkeypatch, capsys, methods, message
):
    monkeypatch.setattr("sys.argv", ["profile_cached_step.py", "--config", "flux-tiny", "--methods", methods])
    with pytest.raises(SystemExit):
        load_script("profile_cached_step").main()
    err = capsys.readouterr().err
    assert "error: --methods: " in err and message in err and "Traceback" not in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--methods", "fora,bogus"], "--methods: unknown method 'bogus' (accepted: "),
        (["--compile-methods", "tocaa"], "--compile-methods: unknown method 'tocaa' (accepted: "),
        (["--ratios", "2,x"], "--ratios: '2,x' is not a comma-separated list of numbers"),
    ],
)
def test_the_speed_bench_refuses_a_bad_method_or_ratio_in_one_line_before_building_anything(
    capsys, args, message
):
    with pytest.raises(SystemExit):
        load_script().main(["--device", "cpu", "--config", "flux-tiny", *args])
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_module_group_holds_a_module_of_every_block():
    transformer = build_transformer(CONFIGS["flux-tiny"], torch.device("cpu"), torch.float32)
    groups = tracked_modules(transformer)
    assert groups["transformer_blocks.*.ff"] == [block.ff for block in transformer.transformer_blocks]
    assert groups["single_transformer_blocks.*"] == list(transformer.single_transformer_blocks)
    assert groups["proj_out"] == [transformer.proj_out]
    assert not any(name.count(".") > 2 for name in groups)  # down to a block's children, no deeper


def test_a_module_breakdown_attributes_a_call_and_its_flops_to_module_groups():
    script, config = load_script("profile_cached_step"), CONFIGS["flux-tiny"]
    loop = DenoisingLoop(build_transformer(config, torch.device("cpu"), torch.float32), config,
                         torch.device("cpu"), torch.float32)  # fmt: skip
    adapter, steps = adapter_for(loop.transformer)(name="t"), config.steps
    reference = CompiledRegions(script.planned(loop, adapter, "none", "F" * steps, "per_step"), False)
    acc = script.planned(
        loop, adapter, "toca", "F" + "c" * (steps - 1), "per_step", **script.breakdown_params("toca")
    )
    method = CompiledRegions(acc, False)
    table = module_breakdown(loop.transformer, False, partial(script.run_once, loop, reference),
                             partial(script.run_once, loop, method), first_cached=1, runs=1)  # fmt: skip
    rows = table.set_index("module")
    # The rows add up to the FULL and the CACHED call the cost model counts: the right calls are read.
    assert rows.loc["total", "full_gflop"] * 1e9 == pytest.approx(acc.cost.full)
    assert rows.loc["total", "cached_gflop"] * 1e9 == pytest.approx(acc.cost.cached)
    # Every FLOP is inside a listed module: block code (gates, residual adds) counts none.
    code = [
        "transformer_blocks.* (block code)",
        "single_transformer_blocks.* (block code)",
        "(transformer code)",
    ]
    assert (rows.loc[code, ["full_gflop", "cached_gflop"]] == 0).all().all()
    # ToCa's CACHED call: the attention reused, the feed-forward on the refreshed tokens alone.
    assert rows.loc["transformer_blocks.*.attn", "cached_gflop"] == 0
    ff = rows.loc["transformer_blocks.*.ff"]
    assert 0 < ff["cached_gflop"] < ff["full_gflop"]
    assert ff["share_ms"] == pytest.approx(ff["full_ms"] * ff["cached_gflop"] / ff["full_gflop"])
    assert table["module"].iloc[-1] == "total" and (table["cached_ms"].iloc[:-1] >= 0).all()


def test_the_module_breakdown_writes_its_own_file_and_is_eager_only(tmp_path, monkeypatch, capsys):
    args = ["--config", "flux-tiny", "--methods", "fora,toca", "--runs", "1", "--modules"]
    monkeypatch.setattr("sys.argv", ["profile_cached_step.py", *args, "--out", str(tmp_path)])
    load_script("profile_cached_step").main()
    table = pd.read_csv(tmp_path / f"{PROFILE}-modules.csv", comment="#")
    last = table.groupby("method", sort=False)["module"].agg(lambda modules: list(modules)[-2:])
    assert last.to_dict() == {m: ["total", "(call without the hooks)"] for m in ("fora", "toca")}
    assert (
        "`(block code)`: a block's time beyond its children's"
        in (tmp_path / f"{PROFILE}-modules.md").read_text()
    )
    monkeypatch.setattr("sys.argv", ["profile_cached_step.py", "--modules", "--compile"])
    with pytest.raises(SystemExit):
        load_script("profile_cached_step").main()
    assert "--modules times the modules of eager calls at one width" in capsys.readouterr().err


def test_the_profile_times_both_sides_with_batched_modulation_in_its_own_file(tmp_path, monkeypatch):
    args = ["--config", "flux-tiny", "--methods", "toca", "--runs", "1", "--modulation", "batched"]
    monkeypatch.setattr("sys.argv", ["profile_cached_step.py", *args, "--out", str(tmp_path)])
    load_script("profile_cached_step").main()
    table = pd.read_csv(tmp_path / f"{PROFILE}-batched-modulation.csv", comment="#")
    assert table["method"].tolist() == ["toca"]
    caption = (tmp_path / f"{PROFILE}-batched-modulation.md").read_text()
    assert "both with `modulation=batched`" in caption


def test_the_profile_with_gemms_times_each_calls_matrix_products_alone_in_a_file_of_its_own(
    tmp_path, monkeypatch, capsys
):
    run_profile(monkeypatch, "--methods", "fora,toca", "--gemms", "--out", str(tmp_path))
    calls = pd.read_csv(tmp_path / f"{PROFILE}.csv", comment="#").set_index("method")
    recomputed = calls["gemm_cached_ms"] / calls["gemm_share_ms"]  # from 4-decimal csv values of ~5 us
    assert (((calls["gemm_ratio"] - recomputed) / recomputed).abs() < 5e-2).all()
    products = pd.read_csv(tmp_path / f"{PROFILE}-gemms.csv", comment="#")
    summed = (products["cached_calls"] * products["streamed_us"] / 1000).groupby(products["method"]).sum()
    assert ((summed - calls["gemm_cached_ms"]).abs() < 1e-3).all()  # the column is the sum of the rows
    fora, toca = (products[products["method"] == m] for m in ("fora", "toca"))
    # FORA's CACHED call runs the embeddings and the head: products its FULL calls run too.
    assert (fora.loc[fora["cached_calls"] > 0, "full_calls"] > 0).all()
    # ToCa's refreshes run the MLPs on a few rows, products no FULL call runs.
    refreshed = toca[(toca["cached_calls"] > 0) & (toca["full_calls"] == 0)]
    rows = lambda frame: frame["product"].str.split(" x ").str[0].astype(int)  # noqa: E731
    assert len(refreshed) and rows(refreshed).max() < rows(toca[toca["full_calls"] > 0]).max()
    assert "`streamed` (a new one at every call" in (tmp_path / f"{PROFILE}-gemms.md").read_text()
    monkeypatch.setattr("sys.argv", ["profile_cached_step.py", "--gemms", "--modules"])
    with pytest.raises(SystemExit):
        load_script("profile_cached_step").main()
    assert "--gemms times the products of whole calls: leave out --modules" in capsys.readouterr().err


@pytest.mark.parametrize(("name", "params", "config_name"), [
    ("none", {}, "flux-tiny"), ("fora", {}, "flux-tiny"), ("toca", {}, "flux-tiny"),
    ("learnibridge", {}, "flux-tiny"), ("toca", {"fused_blocks": False}, "flux-tiny"),
    ("toca", {}, "hunyuan-tiny"),  # a step embedding of two outputs, (temb, token_replace_emb)
])  # fmt: skip
def test_batched_modulation_compiles_inside_the_regions_and_replays_the_eager_latents(
    name, params, config_name
):
    """The modulations only return the row the step embedding's hook picked before the blocks ran,
    so traced into a compiled block (or a chain's norm) they read no step: the regions are per-step
    modulation's, the timed run builds no graph and runs them all, and it computes the eager
    latents bit for bit (a backend that runs dynamo's graphs as they are)."""
    acc, loop = planned(name, modulation="batched", config_name=config_name, **params)
    per_step, _ = planned(name, loop, **params)
    assert [type(r) for r in regions(acc)] == [type(r) for r in regions(per_step)]
    acc.attach()  # no `forward` object of each module's own to guard on (torch 2.11: a graph per block)
    adaln = (AdaLayerNormZero, AdaLayerNormZeroSingle)
    own_forward = ["forward" in vars(m.linear) for m in loop.transformer.modules() if isinstance(m, adaln)]
    acc.remove()
    assert own_forward and not any(own_forward)
    acc.plan(2.0, {"num_inference_steps": loop.config.steps})
    assert "c" in str(acc.runtime.schedule) or name == "none"
    assert_compiled_replays_eager(acc, loop)
