"""`lbridge sample`: images for a prompt set with a method, beside the same-seed full-compute reference."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from statistics import mean

import torch
from omegaconf import DictConfig
from tqdm import tqdm

from lbridge.api import Accelerator
from lbridge.commands.setup import build_adapter, build_method, plan, target_ratio
from lbridge.io import append_jsonl, read_jsonl
from lbridge.media import write_sample
from lbridge.models.base import ModelAdapter
from lbridge.prompts import Prompt, load_prompts
from lbridge.runs import calibration_dir, open_run, reference_method, sample_dir, sample_key

SAMPLES = "samples.jsonl"
# Tags every timed sample with the process that timed it: latencies from different processes (or
# machines) are not comparable as a speedup, and the summary says so when it has to mix them.
PROCESS = uuid.uuid4().hex[:12]


def finished(run: Path) -> dict[int, dict]:
    """Samples already written (their record and their image both present)."""
    return {r["index"]: r for r in read_jsonl(run / SAMPLES) if (run / r["file"]).exists()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generate_run(
    acc: Accelerator, adapter: ModelAdapter, prompts: list[Prompt], run: Path, warmup: int
) -> list[dict]:
    """Generate the prompts not yet in `run`, one image each, timing every generation."""
    done = finished(run)
    todo = [p for p in prompts if p.index not in done]
    label = acc.method.describe()["name"]
    for _ in range(warmup if todo else 0):
        acc.reset()
        adapter.generate(acc.pipe, todo[0].text, todo[0].seed)
    for prompt in tqdm(todo, desc=f"sample {label}", unit="img", disable=not todo):
        acc.reset()
        _sync(adapter.device)
        start = time.perf_counter()
        sample = adapter.generate(acc.pipe, prompt.text, prompt.seed)
        _sync(adapter.device)
        latency = time.perf_counter() - start
        # Video adapters carry a frame rate; it only sets the playback speed of the video file.
        files = write_sample(run, prompt.index, sample, fps=getattr(adapter, "fps", 16))
        record = {
            "index": prompt.index, "prompt": prompt.text, "seed": prompt.seed, **files,
            "latency_s": latency, "flops": acc.sample_flops(), "schedule": acc.runtime.realised_schedule(),
            "device": str(adapter.device), "process": PROCESS,
        }  # fmt: skip
        append_jsonl(run / SAMPLES, record)
        done[prompt.index] = record
    return [done[p.index] for p in prompts]


def speedups(records: list[dict], reference: list[dict]) -> tuple[float, float]:
    flops = mean(r["flops"] for r in reference) / mean(r["flops"] for r in records)
    latency = mean(r["latency_s"] for r in reference) / mean(r["latency_s"] for r in records)
    return flops, latency


def run(cfg: DictConfig) -> Path:
    target_ratio(cfg)
    adapter = build_adapter(cfg)
    method = build_method(cfg.method)
    prompts = load_prompts(cfg.prompts, cfg.num_prompts, cfg.seed)
    pipe = adapter.load_pipeline()
    acc = plan(pipe, adapter, method, cfg, prompts[0].text)  # a bad ratio stops here, nothing written
    if hasattr(method, "load_calibration"):  # calibrated methods: the artifact of this very schedule
        method.load_calibration(calibration_dir(cfg), adapter.transformer(pipe), acc.schedule)

    reference = generate_reference(cfg, adapter, pipe, prompts, None if method.accelerates else acc)
    if not method.accelerates:  # method=none: the reference is the run
        run_dir = sample_dir(cfg)
        print(f"{run_dir}: {len(reference)} images at full compute ({len(acc.schedule)} steps)")
        return run_dir
    run_dir = open_run(sample_dir(cfg), sample_key(cfg))
    records = generate_run(acc.attach(), adapter, prompts, run_dir, int(cfg.timing.warmup_runs))
    acc.remove()

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
    if any(r.get("process") != PROCESS for r in reference):
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
    ref = ref or plan(pipe, adapter, build_method(none_cfg), cfg, prompts[0].text)
    ref_dir = open_run(sample_dir(cfg, none_cfg), sample_key(cfg, none_cfg))
    records = generate_run(ref.attach(), adapter, prompts, ref_dir, int(cfg.timing.warmup_runs))
    ref.remove()
    return records
