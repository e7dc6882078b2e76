"""Time per CACHED call of each method against what its FLOPs share of a FULL call predicts.

    python scripts/profile_cached_step.py --methods fora,toca,learnibridge          # flux-medium, CPU
    python scripts/profile_cached_step.py --device cuda --config flux-dev --profile fora
    python scripts/profile_cached_step.py --out results/speed      # also <device>-cached-step.{csv,md}
    python scripts/profile_cached_step.py --compile --out results/speed   # <device>-cached-step-compiled
    python scripts/profile_cached_step.py --heads 4,8,16 --out results/speed  # width sweep: ...-width
    python scripts/profile_cached_step.py --methods toca --modules --out results/speed  # ...-modules
    python scripts/profile_cached_step.py --methods toca,toca:fused_blocks=false   # a parameter overridden

Each transformer call is timed on its own: the median CACHED call of runs of one FULL step then only
CACHED steps, against the FLOPs share of the median FULL call of all-FULL runs that alternate with
them. The excess is what the latency/FLOPs efficiency loses per CACHED step. CPU: this process's CPU
time (steady on shared cores); CUDA: synchronised wall time. `--compile`: both with the regional
torch.compile of the speed benchmark (each run installs its own compiled regions). `--profile METHOD`
prints torch.profiler's op table of that method's run. `--heads`: the config at several widths (heads
of the same size), one table: the matmuls FLOPs count grow with the square of the width, the work
they leave out (norms, gates, residual adds, gathers, Python) grows with it or stays. `--modules`:
instead, each method's CACHED call module by module against each module's own FLOPs share
(`lbridge.bench.breakdown`): which modules and which block code the excess is made of.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from collections import Counter
from functools import partial
from pathlib import Path
from typing import NamedTuple

import pandas as pd
import torch
import yaml
from torch.profiler import ProfilerActivity, profile

from lbridge.api import Accelerator
from lbridge.bench.breakdown import module_breakdown
from lbridge.bench.device import device_name, file_stem, synchronised_clock
from lbridge.bench.gemms import Product, WeightStream, product_seconds, products_per_call
from lbridge.bench.models import CONFIGS, DenoisingLoop, build_transformer, with_heads
from lbridge.bench.ops import ops_per_call
from lbridge.bench.run import method_params
from lbridge.errors import LbridgeError
from lbridge.methods.base import load_method
from lbridge.models.base import DTYPES, adapter_for, resolve_device
from lbridge.report.tables import write_csv_md
from lbridge.runtime.compile import CompiledRegions
from lbridge.runtime.context import CacheRuntime, SchedulerClock
from lbridge.runtime.modulation import MODULATIONS
from lbridge.runtime.schedule import Schedule


class CallTimer:
    """Seconds of every transformer call (CPU time on CPU, synchronised wall time on CUDA), in order.

    On CUDA also the host's seconds up to the call's return, before the closing sync (`host`): when
    they come near the call's, the host is what bounds it (too many small launches), not the GPU.
    """

    def __init__(self, transformer: torch.nn.Module, cuda: bool) -> None:
        self.cuda, self.now = cuda, synchronised_clock(cuda)
        self.seconds: list[float] = []
        self.host: list[float] = []
        self.handles = [transformer.register_forward_pre_hook(self.start),
                        transformer.register_forward_hook(self.stop)]  # fmt: skip

    def start(self, *_) -> None:
        self.started = self.now()

    def stop(self, *_) -> None:
        if self.cuda:  # before the closing sync: the host's own time up to the call's return
            self.host.append(time.perf_counter() - self.started)
        self.seconds.append(self.now() - self.started)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def run_once(loop: DenoisingLoop, contender: CompiledRegions) -> None:
    with contender.installed() as acc:
        acc.reset()
        loop(loop.config.steps)


def call_seconds(loop: DenoisingLoop, contender: CompiledRegions) -> CallTimer:
    """One run of the loop with `contender` installed: the seconds of each transformer call."""
    timer = CallTimer(loop.transformer, loop.latents.device.type == "cuda")
    try:
        run_once(loop, contender)
    finally:
        timer.remove()
    return timer


class Medians(NamedTuple):
    full: float  # full compute's FULL call
    cached: float  # the method's CACHED call
    host: float | None  # the CACHED call's host seconds (CUDA; None on CPU, where the two are one)
    method_full: float  # the method's own FULL call (its hooks; compiled, its regions)


def paired_medians(
    loop: DenoisingLoop, reference: CompiledRegions, method: CompiledRegions, runs: int
) -> Medians:
    """Median FULL call (reference runs) and median CACHED call (`method` runs), runs alternating;
    the CACHED call's median host seconds, and the median of the method's own FULL calls.

    Calls are timed one by one and the two runs interleave, so a machine that slows down during the
    measurement slows both alike (timing whole runs and subtracting FULL time let drift land on the
    CACHED estimate). The first pair is a warm-up (and, compiled, where the graphs are built).
    """
    full, cached, host, method_full = [], [], [], []
    first_cached = len(loop.branches)  # step 0 is FULL: one call per CFG branch
    for run in range(runs + 1):
        reference_calls, method_calls = call_seconds(loop, reference), call_seconds(loop, method)
        if run:
            full += reference_calls.seconds
            cached += method_calls.seconds[first_cached:]
            host += method_calls.host[first_cached:]
            method_full += method_calls.seconds[:first_cached]
    median = statistics.median
    return Medians(median(full), median(cached), median(host) if host else None, median(method_full))


def dispatched_ops(loop: DenoisingLoop, contender: CompiledRegions) -> dict[str, int]:
    """ATen operations of the first (FULL) call and the median CACHED call, in one untimed eager run."""
    counts = ops_per_call(loop.transformer, lambda: run_once(loop, contender))
    first_cached = len(loop.branches)
    return {"full_ops": counts[0], "cached_ops": int(statistics.median(counts[first_cached:]))}


class ProductTimes(dict):
    """Seconds of each matrix product timed alone (hot, streamed), each product timed once."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device, self.streams = device, {}

    def __missing__(self, product: Product) -> tuple[float, float]:
        stream = self.streams.get(product.dtype) or WeightStream(product.dtype, self.device)
        self.streams[product.dtype] = stream
        hot, streamed = product_seconds(product, self.device), product_seconds(product, self.device, stream)
        self[product] = hot, streamed
        return self[product]


def second_call_products(loop: DenoisingLoop, acc: Accelerator) -> Counter[Product]:
    """The matrix products of the second step's call (one eager run): a steady one, where the first
    call of a run also builds what a run keeps (`modulation=batched`'s tables)."""
    return products_per_call(loop.transformer, lambda: run_once(loop, CompiledRegions(acc, False)))[
        len(loop.branches)
    ]


def gemm_columns(
    full: Counter[Product], cached: Counter[Product], spec: str, times: ProductTimes
) -> tuple[dict, list]:
    """The matrix products of a FULL call (full compute's) and of the method's CACHED call, each timed
    alone: their sums with the weights streamed, the CACHED one against its own FLOPs share of the
    FULL one; and one row per product."""
    products = []
    by_time_in_a_cached_call = lambda p: (-cached[p] * p.flops, -full[p] * p.flops)  # noqa: E731
    for product in sorted(full.keys() | cached.keys(), key=by_time_in_a_cached_call):
        hot, streamed = times[product]
        products.append({"method": spec, "product": product.label(), "op": product.op,
                         "full_calls": full[product], "cached_calls": cached[product],
                         "gflop": product.flops / 1e9, "hot_us": 1e6 * hot, "streamed_us": 1e6 * streamed,
                         "hot_gflops": product.flops / hot / 1e9,
                         "streamed_gflops": product.flops / streamed / 1e9})  # fmt: skip

    def total(counts) -> tuple[float, int]:
        return sum(n * times[p][1] for p, n in counts.items()), sum(n * p.flops for p, n in counts.items())

    (full_s, full_flops), (cached_s, cached_flops) = total(full), total(cached)
    share = full_s * cached_flops / full_flops
    columns = {"gemm_cached_ms": 1000 * cached_s, "gemm_share_ms": 1000 * share,
               "gemm_excess_ms": 1000 * (cached_s - share), "gemm_ratio": cached_s / share}  # fmt: skip
    return columns, products


def planned(loop: DenoisingLoop, adapter, name: str, pattern: str, modulation: str, **params) -> Accelerator:
    method = load_method(name, **{**method_params(name, loop.config.steps), **params})
    acc = Accelerator(loop, method, adapter, modulation)
    acc.plan(1.0, {"num_inference_steps": loop.config.steps})
    acc.runtime = CacheRuntime(SchedulerClock(loop.scheduler), Schedule.parse(pattern))
    return acc


def profile_config(
    config, args: argparse.Namespace, device: torch.device, dtype: torch.dtype, products: list | None = None
) -> list[dict]:
    """One row per method: its median CACHED call against its FLOPs share of the median FULL call.
    With `args.gemms`, also its matrix products' (`gemm_columns`), one row per product into `products`."""
    loop = DenoisingLoop(build_transformer(config, device, dtype), config, device, dtype)
    adapter = adapter_for(loop.transformer)(name=config.name, device=str(device))
    steps = config.steps
    options = {"backend": args.compile_backend}
    full_compute = planned(loop, adapter, "none", "F" * steps, args.modulation)
    reference = CompiledRegions(full_compute, args.compile, **options)
    rows, times = [], ProductTimes(device)
    full_products = second_call_products(loop, full_compute) if args.gemms else None
    for spec in args.methods.split(","):
        name, params = method_spec(spec)
        acc = planned(loop, adapter, name, "F" + "c" * (steps - 1), args.modulation, **params)
        method = CompiledRegions(acc, args.compile, **options)
        full, cached, host, method_full = paired_medians(loop, reference, method, args.runs)
        predicted = full * acc.cost.cached / acc.cost.full
        print(
            f"{config.name} {spec:12s} CACHED call {1000 * cached:7.2f} ms; FLOPs share predicts "
            f"{1000 * predicted:7.2f} ms (FULL call {1000 * full:.2f} ms)"
        )
        rows.append({"method": spec, "cached_ms": 1000 * cached, "flops_share_ms": 1000 * predicted,
                     "excess_ms": 1000 * (cached - predicted), "ratio": cached / predicted,
                     "full_ms": 1000 * full, "method_full_ms": 1000 * method_full,
                     "cached_host_ms": None if host is None else 1000 * host,
                     **({} if args.compile else dispatched_ops(loop, method))})  # fmt: skip
        if args.gemms:
            columns, per_product = gemm_columns(full_products, second_call_products(loop, acc), spec, times)
            rows[-1].update(columns)
            products += per_product
            print(
                f"{'':{len(config.name)}s} {spec:12s} products alone {columns['gemm_cached_ms']:7.2f} ms; "
                f"their own share {columns['gemm_share_ms']:7.2f} ms"
            )
        if spec == args.profile:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            with method.installed(), profile(activities=activities) as prof:
                acc.reset()
                loop(steps)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    return rows


def method_spec(spec: str) -> tuple[str, dict]:
    """`toca:fused_blocks=false` -> ("toca", {"fused_blocks": False}): a method with parameters of its
    config overridden (values read as YAML), to time two variants of one method side by side."""
    name, *overrides = spec.split(":")
    params = {}
    for override in overrides:
        key, sep, value = override.partition("=")
        if not (sep and key):
            raise SystemExit(f"--methods: '{spec}' is not METHOD or METHOD:KEY=VALUE[:KEY=VALUE...]")
        params[key] = yaml.safe_load(value)
    return name, params


def breakdown_params(name: str) -> dict:
    """ToCa's blocks run under their modules' hooks for the breakdown: its one-forward blocks (the
    default, `fused_blocks`) call the chains' modules unhooked, where no module boundary records them."""
    return {"fused_blocks": False} if name == "toca" else {}


def breakdown_config(config, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list:
    """One row per method and module group: the CACHED call's time there against its FLOPs share."""
    loop = DenoisingLoop(build_transformer(config, device, dtype), config, device, dtype)
    adapter = adapter_for(loop.transformer)(name=config.name, device=str(device))
    reference = CompiledRegions(planned(loop, adapter, "none", "F" * config.steps, args.modulation), False)
    rows = []
    for name in args.methods.split(","):
        acc = planned(
            loop, adapter, name, "F" + "c" * (config.steps - 1), args.modulation, **breakdown_params(name)
        )
        method = CompiledRegions(acc, False)
        full, cached = partial(run_once, loop, reference), partial(run_once, loop, method)
        table = module_breakdown(loop.transformer, device.type == "cuda", full, cached, len(loop.branches),
                                 args.runs)  # fmt: skip
        full_s, cached_s, *_ = paired_medians(loop, reference, method, args.runs)  # what the hooks add
        unhooked = {"module": UNHOOKED, "full_ms": 1000 * full_s, "cached_ms": 1000 * cached_s}
        table = pd.concat([table, pd.DataFrame([unhooked])], ignore_index=True)
        print(f"{config.name} {name}: CACHED call by module\n{table.to_string(index=False)}")
        rows += [{"method": name, **row} for row in table.to_dict("records")]
    return rows


def head_counts(text: str) -> list[int]:
    """`--heads 4,8,16` -> [4, 8, 16]; anything else is refused in one line."""
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of positive head counts")
    return counts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--config", default="flux-medium", choices=sorted(CONFIGS))
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES))
    p.add_argument(
        "--methods", default="fora,taylorseer,foca,toca,l2p,tcc,learnibridge,teacache,fbcache,magcache"
    )
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--compile", action="store_true", help="regional torch.compile, as the speed benchmark")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--heads", default=None, type=head_counts,
                   help="comma-separated head counts: a width sweep of the config")  # fmt: skip
    p.add_argument("--modulation", default="per_step", choices=MODULATIONS,
                   help="batched: AdaLN modulations once per run for all steps (both sides)")  # fmt: skip
    p.add_argument("--profile", default=None, help="a method whose run torch.profiler tabulates")
    p.add_argument("--modules", action="store_true",
                   help="each CACHED call by module vs the module's FLOPs share (eager only)")  # fmt: skip
    p.add_argument("--gemms", action="store_true",
                   help="also each call's matrix products timed alone (<stem>-gemms)")  # fmt: skip
    p.add_argument("--out", default=None, help="directory of <device>-cached-step.{csv,md} (default: print)")
    p.add_argument(
        "--name", default=None, help="file stem (default: <device>[-<config>]-cached-step[-width][-compiled])"
    )
    args = p.parse_args()
    if args.modules and (args.compile or args.heads):
        p.error("--modules times the modules of eager calls at one width: leave out --compile and --heads")
    if args.gemms and args.modules:
        p.error("--gemms times the products of whole calls: leave out --modules")
    for spec in args.methods.split(","):  # before minutes of timing: a bad name or key is one line
        name, params = method_spec(spec)
        try:
            load_method(name, **{**method_params(name, CONFIGS[args.config].steps), **params})
        except LbridgeError as err:
            p.error(f"--methods: {err}")
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    config, products = CONFIGS[args.config], []
    if args.heads:  # a width sweep: one table, a `dim` column
        rows = []
        for heads in args.heads:
            dim, widened = heads * config.transformer["attention_head_dim"], with_heads(config, heads)
            before = len(products)
            rows += [{"dim": dim, **row} for row in profile_config(widened, args, device, dtype, products)]
            products[before:] = [{"dim": dim, **row} for row in products[before:]]
    elif args.modules:
        rows = breakdown_config(config, args, device, dtype)
    else:
        rows = profile_config(config, args, device, dtype, products)
    if args.out:
        write(pd.DataFrame(rows), args, device, config, pd.DataFrame(products))


UNHOOKED = "(call without the hooks)"
CALL_COLUMNS = (
    "- `method_full_ms`: the method's own FULL call (its hooks; compiled, its regions), the median of "
    "one per run: beside `full_ms`, what its FULL steps cost beyond full compute's. "
    "`full_ops`, `cached_ops` (eager only): ATen operations a FULL and a CACHED call dispatch, views "
    "included: each costs host time whatever its size. `cached_host_ms` (CUDA only): the host's time "
    "of a CACHED call up to its return; near `cached_ms`, the host bounds the call, not the GPU"
)
GEMM_COLUMNS = (
    ". `gemm_*` (`--gemms`): the matrix products (`mm`, `addmm`, `bmm`, `baddbmm`; attention kernels "
    "are not among them) of full compute's FULL call and of the method's CACHED call (one eager run "
    "each records them), each timed alone with its weight streamed, summed per call: "
    "`gemm_cached_ms` against `gemm_share_ms`, the FULL call's sum x the products' CACHED/FULL FLOPs; "
    "`gemm_excess_ms` their difference, the products' own excess with no Python, bookkeeping or "
    "elementwise work in it (beside `excess_ms`, whose share prices that work in the FULL call too: "
    "the two compare, they do not add up)"
)
PRODUCT_COLUMNS = (
    "- one row per matrix product of full compute's FULL call or the method's CACHED call: `product` "
    "rows x k x n (rows: every dimension of the left matrix but its last); `full_calls`, how many a "
    "FULL call runs (full compute's second call: a run's first also builds what the run keeps), "
    "`cached_calls`, how many the method's first CACHED call runs (one eager run each records them); "
    "each product timed alone, fastest of 3 rounds after a warm-up round, with its right matrix (a "
    "linear layer's weight) `hot` (the same matrix at every call: in cache when it fits) and "
    "`streamed` (a new one at every call, views walking through a 256 MB pool, beyond any last-level "
    "cache: as a call that reads every block's weights once meets them). A product of few rows whose "
    "`streamed_gflops` falls below its `hot_gflops` is bound by reading its weights"
)
MODULE_COLUMNS = (
    "- `module`: a module of every block (`transformer_blocks.*.ff`) or of the transformer; "
    "`(block code)`: a block's time beyond its children's (modulation gates, residual adds, "
    "concatenations, Python, and what a method runs in the block's place: LearniBridge's bridge, a "
    "LoRA copy of the final block); `(transformer code)`: the call's beyond every row above. `share_ms`: the "
    "group's FULL time x its own CACHED/FULL FLOPs (0 where its FULL call counts none: norms, "
    "activations, block code); `excess_ms` = `cached_ms` - `share_ms`; `total`: the sum of the rows. "
    "Its `share_ms` is not the call's FLOPs share (`full_ms` x `cached_gflop` / `full_gflop` of the "
    "total): groups differ in time per FLOP, and a group whose FULL time is mostly uncounted work (an "
    "AdaLN norm: a few FLOPs of modulation, a norm over every token) gets a share its CACHED call may "
    "undercut. `(call without the hooks)`: the same calls timed without the hooks that time each module "
    "(medians of as many runs); the `total` above it is the call plus what the hooks cost"
)


def write(
    table: pd.DataFrame, args: argparse.Namespace, device: torch.device, config, products: pd.DataFrame
) -> None:
    command = "python " + " ".join(shlex.quote(a) for a in ["scripts/profile_cached_step.py", *sys.argv[1:]])
    clock = "synchronised wall time" if device.type == "cuda" else "this process's CPU time"
    compiled = f"; both with regional torch.compile ({args.compile_backend})" if args.compile else ""
    batched = "; both with `modulation=batched` (AdaLN modulations once per run)"
    batched = batched if args.modulation == "batched" else ""
    runs = (
        f"medians over {args.runs} runs of 1 FULL + {config.steps - 1} CACHED steps, alternating with "
        f"{args.runs} all-FULL runs"
    )
    if args.modules:
        what = (
            f"Each CACHED call module by module, {clock} inside each module group (hooks at every module "
            f"boundary): {runs}; FLOPs counted in one more run of each{batched}."
        )
    else:
        what = (
            f"Time per CACHED call vs its FLOPs share of a FULL call, {clock} of each transformer call: "
            f"{runs} (`full_ms`){compiled}{batched}."
        )
    caption = (
        f"{what}\n\n- command: `{command}`\n- config: {config.name} ({config.note})"
        f"{'; widths: the `dim` column (heads of the same size)' if args.heads else ''}\n"
        f"- device: {device_name(device)}; torch {torch.__version__}; "
        f"load average (1 min) {os.getloadavg()[0]:.2f} at the end\n"
    )
    columns = MODULE_COLUMNS if args.modules else CALL_COLUMNS + (GEMM_COLUMNS if args.gemms else "")
    suffix = ("-width" if args.heads else "") + ("-compiled" if args.compile else "")
    suffix += "-modules" if args.modules else ""
    suffix += "-batched-modulation" if args.modulation == "batched" else ""
    stem = args.name or f"{file_stem(device, config.name)}-cached-step{suffix}"
    files = write_csv_md(table, Path(args.out), stem, caption + columns + "\n\n", command)
    if args.gemms:
        what = f"The matrix products of each method's calls, each timed alone ({clock}){batched}.\n\n"
        caption = what + caption + PRODUCT_COLUMNS + "\n\n"
        files += write_csv_md(products, Path(args.out), f"{stem}-gemms", caption, command)
    print("written:", ", ".join(map(str, files)))


if __name__ == "__main__":
    main()
