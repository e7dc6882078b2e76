"""`lbridge eval`: metrics of a sampled run, written to metrics.json in the run directory."""

from __future__ import annotations

import math
from pathlib import Path
from statistics import mean

from omegaconf import DictConfig
from PIL import Image

from lbridge.commands.sample import finished, speedups
from lbridge.errors import LbridgeError
from lbridge.io import write_json
from lbridge.metrics.digit_accuracy import digit_accuracy
from lbridge.metrics.reference import psnr, ssim
from lbridge.prompts import load_prompts
from lbridge.runs import reference_method, sample_dir

PAIRED = {"psnr": psnr, "ssim": ssim}
PROMPTED = {"digit_accuracy": digit_accuracy}


def load_records(run: Path, count: int, what: str) -> list[dict]:
    records = finished(run)
    if len(records) < count:
        raise LbridgeError(f"{what} run {run} has {len(records)}/{count} samples: run `lbridge sample` first")
    return [records[i] for i in range(count)]


def _open(run: Path, records: list[dict]) -> list[Image.Image]:
    return [Image.open(run / r["file"]) for r in records]


def run(cfg: DictConfig) -> Path:
    count = len(load_prompts(cfg.prompts, cfg.num_prompts, cfg.seed))
    run_dir, ref_dir = sample_dir(cfg), sample_dir(cfg, reference_method())
    records = load_records(run_dir, count, cfg.method.name)
    reference = load_records(ref_dir, count, "reference (method=none)")
    images, ref_images = _open(run_dir, records), _open(ref_dir, reference)

    flops_x, latency_x = speedups(records, reference)
    metrics = {
        "model": cfg.model.name, "method": cfg.method.name,
        "ratio_target": float(cfg.ratio) if cfg.method.name != "none" else 1.0,
        "flops_speedup": flops_x, "latency_speedup": latency_x,
        "schedule": records[0]["schedule"], "num_samples": count,
    }  # fmt: skip
    for name in cfg.model.get("metrics", ["psnr", "ssim"]):
        if name in PAIRED:
            values = [PAIRED[name](a, b) for a, b in zip(images, ref_images, strict=True)]
            metrics[name] = mean(values) if all(math.isfinite(v) for v in values) else float("inf")
        elif name in PROMPTED:
            metrics[name] = PROMPTED[name](images, [r["prompt"] for r in records])
        else:
            accepted = ", ".join([*PAIRED, *PROMPTED])
            raise LbridgeError(f"unknown metric '{name}' in model.metrics (accepted: {accepted})")
    write_json(run_dir / "metrics.json", metrics)
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
    return run_dir
