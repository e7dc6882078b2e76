"""Latency speedup vs FLOPs speedup of every method, eager and compiled -> results/speed/<device>.{csv,md}.

    python scripts/bench_speed.py                                   # CPU: the flux-medium config
    python scripts/bench_speed.py --device cuda --config flux-dev --dtype bfloat16
    python scripts/bench_speed.py --methods fora,taylorseer --ratios 2,4 --repeats 5 --no-compile

The transformer of the config is built with random weights (timing needs shapes, not weights) and
driven by a flow-matching Euler loop over fixed random inputs with each method's hooks installed,
as `lbridge sample` runs them (lbridge/bench). See README "Speed" for the columns.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from lbridge.bench.calibrate import time_bridge_fit
from lbridge.bench.device import default_config, device_name, file_stem
from lbridge.bench.models import CONFIGS, BenchConfig, build_transformer
from lbridge.bench.run import COLUMNS, DEFAULT_METHODS, BenchOptions, SpeedBench, method_params
from lbridge.errors import LbridgeError
from lbridge.io import atomic_write_bytes
from lbridge.methods.base import load_method
from lbridge.models.base import DTYPES, adapter_for, resolve_device
from lbridge.report.tables import to_markdown
from lbridge.runtime.modulation import MODULATIONS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", help="cpu | cuda | auto (default)")
    p.add_argument("--config", default=None, choices=sorted(CONFIGS),
                   help="default: flux-dev on CUDA, flux-medium on CPU")  # fmt: skip
    p.add_argument(
        "--dtype", default=None, choices=sorted(DTYPES), help="default: bfloat16 on CUDA, float32 on CPU"
    )
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    p.add_argument("--ratios", default="2,3,4,5,6")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the config's)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed runs per row (the fastest is reported; >= 1)")  # fmt: skip
    p.add_argument("--warmup-runs", type=int, default=1, help="untimed runs before each row's timing")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="also time with regional torch.compile (eager is always timed)")  # fmt: skip
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend")
    p.add_argument("--compile-methods", default=None, help="methods timed compiled (default: --methods)")
    p.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=True,
                   help="time LearniBridge's LoRA fit at each ratio (calibrate_s)")  # fmt: skip
    p.add_argument(
        "--calib-prompts", type=int, default=None, help="trajectories fitted (default 5 CUDA, 2 CPU)"
    )
    p.add_argument("--calib-steps", type=int, default=None, help="optimiser steps (default 400 CUDA, 20 CPU)")
    p.add_argument("--paired", action=argparse.BooleanOptionalAction, default=None,
                   help="time full compute in every row, runs alternating with the method's (default: "
                   "on CPU, whose speed drifts; off on CUDA, where it doubles the device time)")  # fmt: skip
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's; 1 is steadier on shared cores)")  # fmt: skip
    p.add_argument("--modulation", default="per_step", choices=MODULATIONS,
                   help="batched: every AdaLN modulation once per run for all steps, in every row "
                   "(file stem gets -batched-modulation)")  # fmt: skip
    p.add_argument("--out", default="results/speed", help="directory of <device>.csv and <device>.md")
    p.add_argument("--name", default=None, help="file stem (default: cpu, or the CUDA device name; "
                   "then -<config> for a config not the device's default)")  # fmt: skip
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1 (a row needs a timed run), got {args.repeats}")
    try:
        args.ratios = tuple(float(r) for r in args.ratios.split(","))
    except ValueError:
        p.error(f"--ratios: '{args.ratios}' is not a comma-separated list of numbers (e.g. 2,3,4)")
    for option in ("methods", "compile_methods"):  # before minutes of timing: a bad name is one line
        for name in filter(None, (getattr(args, option) or "").split(",")):
            try:
                load_method(name, **method_params(name, args.steps or 20))
            except LbridgeError as err:
                p.error(f"--{option.replace('_', '-')}: {err}")
    return args


def header(args: argparse.Namespace, config: BenchConfig, device: torch.device, dtype: torch.dtype,
           loads: list[float], paired: bool) -> list[str]:  # fmt: skip
    when = "in every row, runs alternating with the method's" if paired else "once per pass"
    timing = f"fastest of {args.repeats} runs (latency_s, reference_s); full compute timed {when}"
    command = "python " + " ".join(shlex.quote(a) for a in ["scripts/bench_speed.py", *sys.argv[1:]])
    batched = args.modulation == "batched"
    return [
        f"command: {command}",
        f"config: {config.name} ({config.note}), {config.steps} steps, {dtype}, batch 1"
        + ("; `modulation=batched` in every row (AdaLN modulations once per run)" if batched else ""),
        f"device: {device_name(device)}",
        f"timing: {timing}",
        f"torch {torch.__version__}; load average (1 min) {min(loads):.2f}-{max(loads):.2f} during the run",
        "peak_mem_gb: torch.cuda.max_memory_allocated (blank on CPU); cache_mb: the most bytes the method's "
        "cache holds after any call of a run"
        + (", with the sample's modulation tables (full compute's row: the tables alone)" if batched else "")
        + "; run_peak_mb: the most the tensors a run allocates hold at once (activations, cache, outputs), "
        "beyond the weights and inputs live at its start, in one more, untimed run "
        + ("(the allocator's peak)" if device.type == "cuda" else "(the profiler's allocation events)"),
    ]


def write_results(rows: list[dict[str, Any]], lines: list[str], out: Path, stem: str) -> pd.DataFrame:
    """`out/stem.csv` and `.md`, each replaced whole (a run killed while it rewrites them after a row,
    or a copy taken meanwhile, holds the previous rows, never a torn file: scripts/gpu_run.sh copies
    them off the device as they change)."""
    table = pd.DataFrame(rows, columns=list(COLUMNS)).dropna(axis=1, how="all")
    comments = "".join(f"# {line}\n" for line in lines)
    csv = comments + table.to_csv(index=False, float_format="%.4f")
    atomic_write_bytes(out / f"{stem}.csv", csv.encode())
    text = "\n".join(f"- {line}" for line in lines)
    atomic_write_bytes(out / f"{stem}.md", f"# Speed: {stem}\n\n{text}\n\n{to_markdown(table)}\n".encode())
    return table


def merge_calibration(rows: list[dict[str, Any]], fits: dict[float, dict[str, Any]]) -> None:
    for row in rows:
        fit = fits.get(row["ratio_target"]) if row["method"] == "learnibridge" else None
        if fit and row["mode"] == "eager" and "calibrate_s" in fit:
            row["calibrate_s"] = fit["calibrate_s"]
            steps, pairs = fit["optimiser_steps"], fit["pairs"]
            note = f"fit: {steps} optimiser steps, {pairs} pairs, {fit['prompts']} prompts"
            row["note"] = "; ".join(n for n in (row.get("note"), note) if n)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    args = parse_args(argv)
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    config = CONFIGS[args.config or default_config(device)]
    config = replace(config, steps=args.steps or config.steps)
    dtype = DTYPES[args.dtype or ("bfloat16" if cuda else "float32")]
    methods = [m for m in args.methods.split(",") if m]
    ratios = args.ratios
    loads: list[float] = [os.getloadavg()[0]]
    if args.threads:
        torch.set_num_threads(args.threads)

    suffix = "-batched-modulation" if args.modulation == "batched" else ""
    stem, out = args.name or file_stem(device, config.name) + suffix, Path(args.out)

    def on_row(row: dict[str, Any]) -> None:
        loads.append(os.getloadavg()[0])
        shown = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items() if v is not None}
        print(shown, flush=True)
        # Rewritten after every row: a long run that is cut short still leaves its rows.
        write_results(bench.rows, header(args, config, device, dtype, loads, paired), out, stem)

    transformer = build_transformer(config, device, dtype)
    adapter = adapter_for(transformer)(name=config.name, device=str(device))
    modes = (False, True) if args.compile else (False,)
    paired = not cuda if args.paired is None else args.paired
    options = BenchOptions(ratios=ratios, repeats=args.repeats, warmup_runs=args.warmup_runs,
                           compile_modes=modes, on_row=on_row, paired=paired, modulation=args.modulation,
                           compile_options={"backend": args.compile_backend})  # fmt: skip
    bench = SpeedBench(config, transformer, adapter, device, dtype, options)
    compiled = [m for m in (args.compile_methods or args.methods).split(",") if m]
    rows = bench.run(methods, compiled_methods=compiled)
    if args.calibrate and "learnibridge" in methods:
        fits = time_bridge_fit(bench.loop, adapter, ratios, args.calib_prompts or (5 if cuda else 2),
                               args.calib_steps or (400 if cuda else 20))  # fmt: skip
        loads.append(os.getloadavg()[0])
        merge_calibration(rows, fits)
    table = write_results(rows, header(args, config, device, dtype, loads, paired), out, stem)
    print(table.to_string())
    return table


if __name__ == "__main__":
    main()
