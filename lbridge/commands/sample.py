"""`lbridge sample`: images for a prompt set with a method, beside the same-seed full-compute reference."""

from __future__ import annotations

import contextlib
import json
import time
from functools import cache
from pathlib import Path
from statistics import mean

import torch
from omegaconf import DictConfig
from tqdm import tqdm

from lbridge import distributed
from lbridge.api import Accelerator
from lbridge.calibration.job import check_artifact
from lbridge.commands.setup import build_adapter, build_method, check_runtime, compiled, plan, target_ratio
from lbridge.io import append_jsonl, atomic_write_bytes, read_jsonl
from lbridge.media import write_sample
from lbridge.models.base import ModelAdapter
from lbridge.prompts import Prompt, load_prompts
from lbridge.runs import (
    calibration_dir,
    calibration_key,
    check_plan,
    key_hash,
    open_run,
    reference_method,
    sample_dir,
    sample_key,
)
from lbridge.runtime.compile import CompiledRegions, CompileStats
from lbridge.runtime.modulation import check_batchable

SAMPLES = "samples.jsonl"
RANK_SAMPLES = "samples.rank-*.jsonl"  # a data-parallel rank's records until rank 0 merges them
#: Record fields that differ between runs of the same config (wall time, which process, which GPU,
#: its allocator's peak); every other field, and every image, is byte-identical across reruns,
#: resumes and process counts.
UNDETERMINED = ("latency_s", "process", "device", "peak_mem_gb")


@cache
def process_tag() -> str:
    """Tags every timed sample with the launch that timed it: latencies from different launches (or
    machines) are not comparable as a speedup, and the summary says so when it has to mix them. All
    ranks of one data-parallel launch share rank 0's tag (called by every rank at the same point)."""
    return distributed.shared_token()


def finished(run: Path) -> dict[int, dict]:
    """Samples already written (their record and their image both present), merged or not."""
    shards = [run / SAMPLES, *sorted(run.glob(RANK_SAMPLES))]
    return {r["index"]: r for shard in shards for r in read_jsonl(shard) if (run / r["file"]).exists()}


def records_file(run: Path) -> Path:
    here = distributed.world()
    return run / (f"samples.rank-{here.rank:05d}.jsonl" if here.parallel else SAMPLES)


def merge_records(run: Path, started: float) -> None:
    """Rank 0, all ranks done: the ranks' shards become one samples.jsonl ordered by index, as a
    single process writes it; temporary files older than `started` (left by a killed run) go.

    Nothing is rewritten when there are no shards: independent jobs of a sweep may be filling the
    same reference run at once (appends and atomic renames keep that safe; duplicates are read as
    one record), and a rewrite could drop a line another job is appending. samples.jsonl is
    replaced before the shards go: a kill in between leaves duplicates, read as one record each.
    """
    if shards := sorted(run.glob(RANK_SAMPLES)):
        records = finished(run)
        text = "".join(json.dumps(records[i], sort_keys=True) + "\n" for i in sorted(records))
        atomic_write_bytes(run / SAMPLES, text.encode())
        for shard in shards:
            shard.unlink(missing_ok=True)
    for leftover in run.glob(".*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            if leftover.stat().st_mtime < started:  # a live writer's temporary file is newer
                leftover.unlink()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict[str, float]:
    """CUDA: `peak_mem_gb`, the most memory torch held during the generation (weights, activations,
    the method's cache); nothing on other devices, whose allocators do not count it."""
    if device.type != "cuda":
        return {}
    return {"peak_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30}


def generate_run(
    contender: CompiledRegions, adapter: ModelAdapter, prompts: list[Prompt], run: Path, warmup: int
) -> list[dict]:
    """Generate the prompts of this rank not yet in `run`, one image each, timing every generation;
    return the records of all `prompts` once every rank is done and rank 0 has merged them.

    `contender`: the planned accelerator, installed (its compiled regions, then its hooks) only here."""
    started = time.time()
    done = finished(run)
    todo = [p for p in distributed.mine(prompts) if p.index not in done]
    if todo:
        with contender.installed() as acc:
            _generate(acc, adapter, todo, run, warmup, contender.stats)
    distributed.barrier()  # every rank's images and records are on disk
    if distributed.world().main:
        merge_records(run, started)
    distributed.barrier()  # the merged samples.jsonl is in place for every rank to read
    done = finished(run)
    return [done[p.index] for p in prompts]


def _generate(
    acc: Accelerator, adapter: ModelAdapter, todo: list[Prompt], run: Path, warmup: int, stats: CompileStats
) -> None:
    here = distributed.world()
    label = acc.method.describe()["name"] + (f" [rank {here.rank}/{here.size}]" if here.parallel else "")

    def warm_up() -> None:  # compiles, when compiled: the timed generations below build no graph
        for _ in range(warmup):
            acc.reset()
            adapter.generate(acc.pipe, todo[0].text, todo[0].seed)

    stats.mark_warm(warm_up)
    for prompt in tqdm(todo, desc=f"sample {label}", unit="img"):
        acc.reset()
        _sync(adapter.device)
        _reset_peak(adapter.device)
        start = time.perf_counter()
        sample = adapter.generate(acc.pipe, prompt.text, prompt.seed)
        _sync(adapter.device)
        latency = time.perf_counter() - start
        # Video adapters carry a frame rate; it only sets the playback speed of the video file.
        files = write_sample(run, prompt.index, sample, fps=getattr(adapter, "fps", 16))
        record = {
            "index": prompt.index, "prompt": prompt.text, "seed": prompt.seed, **files,
            "latency_s": latency, "flops": acc.sample_flops(), "schedule": acc.runtime.realised_schedule(),
            "device": str(adapter.device), "process": process_tag(), **peak_memory(adapter.device),
        }  # fmt: skip
        append_jsonl(records_file(run), record)
    stats.mark_timed()
    if stats.enabled:
        counts = stats.row()
        # 0 new graphs is no failure: regions whose graphs this process already built (full
        # compute's blocks, for a block-level method) replay them.
        print(
            f"torch.compile: {counts['regions']} regions, {counts['graphs']} new graphs, "
            f"{counts['recompiles']} built during the timed generations, "
            f"{counts['graph_breaks']} graph breaks ({label})"
        )


def mean_peak_memory(records: list[dict]) -> float | None:
    """Mean `peak_mem_gb` of the records, when every one has it (CUDA runs)."""
    peaks = [r.get("peak_mem_gb") for r in records]
    return mean(peaks) if peaks and None not in peaks else None


def peak_memory_line(records: list[dict], reference: list[dict]) -> str:
    method, full = mean_peak_memory(records), mean_peak_memory(reference)
    if method is None:
        return ""
    versus = f" (method=none: {full:.2f} GiB, {method - full:+.2f})" if full is not None else ""
    return f"peak CUDA memory {method:.2f} GiB per generation{versus}"


def speedups(records: list[dict], reference: list[dict]) -> tuple[float, float]:
    flops = mean(r["flops"] for r in reference) / mean(r["flops"] for r in records)
    latency = mean(r["latency_s"] for r in reference) / mean(r["latency_s"] for r in records)
    return flops, latency


def run(cfg: DictConfig) -> Path:
    target_ratio(cfg)
    check_runtime(cfg)
    adapter = build_adapter(cfg)
    check_batchable(adapter, cfg.runtime.modulation, "runtime.modulation")  # before the weights load
    distributed.init(adapter.device)
    process_tag()
    method = build_method(cfg.method)
    prompts = load_prompts(cfg.prompts, cfg.num_prompts, cfg.seed)
    pipe = adapter.load_pipeline()
    acc = plan(pipe, adapter, method, cfg, prompts[0].text, cfg.runtime.modulation)  # a bad ratio stops here
    if hasattr(method, "load_calibration"):  # calibrated methods: the artifact of this very schedule
        check_artifact(calibration_dir(cfg), calibration_key(cfg), key_hash(calibration_key(cfg)))
        method.load_calibration(calibration_dir(cfg), adapter.transformer(pipe), acc.schedule)

    reference = generate_reference(cfg, adapter, pipe, prompts, None if method.accelerates else acc)
    if not method.accelerates:  # method=none: the reference is the run
        run_dir = sample_dir(cfg)
        if distributed.world().main:
            print(f"{run_dir}: {len(reference)} images at full compute ({len(acc.schedule)} steps)")
        return run_dir
    run_dir = open_run(sample_dir(cfg), sample_key(cfg))
    check_plan(
        run_dir, {"schedule": str(acc.schedule), "full_flops": acc.cost.full, "cached_flops": acc.cost.cached}
    )
    records = generate_run(compiled(acc, cfg), adapter, prompts, run_dir, int(cfg.timing.warmup_runs))
    if not distributed.world().main:  # rank 0 reports for the whole launch
        return run_dir

    flops_x, latency_x = speedups(records, reference)
    schedule = acc.schedule
    print(
        f"{run_dir}: {len(records)} images, schedule {schedule} ({schedule.num_full}/{len(schedule)} FULL; "
        f"a cached step costs {acc.cost.cached_fraction:.1%} of a full step's FLOPs)"
    )
    print(
        f"FLOPs speedup {flops_x:.2f}x (target {cfg.ratio:g}x)  latency speedup {latency_x:.2f}x  "
        f"vs method=none, same {len(prompts)} seeds"
    )
    if memory := peak_memory_line(records, reference):
        print(memory)
    if any(r.get("process") != process_tag() for r in reference):
        print(
            "note: the reference images were timed by an earlier process; its latencies may not be comparable"
        )
    return run_dir


def generate_reference(
    cfg: DictConfig, adapter: ModelAdapter, pipe, prompts: list[Prompt], ref: Accelerator | None = None
) -> list[dict]:
    """The full-compute run with the same prompts and seeds (reused when already complete).

    `ref` is the already planned `none` accelerator when the command itself samples `method=none`.
    """
    none_cfg = reference_method()
    ref = ref or plan(pipe, adapter, build_method(none_cfg), cfg, prompts[0].text, cfg.runtime.modulation)
    ref_dir = open_run(sample_dir(cfg, none_cfg), sample_key(cfg, none_cfg))
    return generate_run(compiled(ref, cfg), adapter, prompts, ref_dir, int(cfg.timing.warmup_runs))
