"""`lbridge eval`: metrics of a sampled run, written to metrics.json in the run directory.

`model.metrics` names the metrics. psnr, ssim and digit_accuracy are plain functions; every other
name is a node of `metrics` (lbridge/conf/metrics/<name>.yaml), a torchmetrics-style object whose
`kind` says what it is fed:
  paired    update(images, references)  the same-seed full-compute images (lpips)
  prompted  update(images, prompts)     (clip_score, image_reward)
  set       update(images, real=...)    the real set is `metrics.<name>.reference` (a directory of
            images) or, when null, the same-seed full-compute reference run (fid, kid, digit_fid)
  video     update(video files, prompts) (vbench)
Each metric's `description` (backbone, weights, formula) goes to metrics.json's `metric_notes`.
"""

from __future__ import annotations

import math
from pathlib import Path
from statistics import mean
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from lbridge import distributed
from lbridge.commands.sample import finished, mean_peak_memory, speedups
from lbridge.commands.setup import check_runtime
from lbridge.config import CONF_DIR, group_options, instantiate_node
from lbridge.errors import LbridgeError
from lbridge.io import write_json
from lbridge.metrics.digit_accuracy import digit_accuracy
from lbridge.metrics.images import image_dir
from lbridge.metrics.reference import psnr, ssim
from lbridge.prompts import load_prompts
from lbridge.runs import reference_method, sample_dir

PAIRED = {"psnr": psnr, "ssim": ssim}
PROMPTED = {"digit_accuracy": digit_accuracy}
EVAL_ONLY_KEYS = ("reference",)  # read by eval, not passed to the metric's constructor


def load_records(run: Path, count: int, what: str) -> list[dict]:
    records = finished(run)
    if len(records) < count:
        raise LbridgeError(f"{what} run {run} has {len(records)}/{count} samples: run `lbridge sample` first")
    return [records[i] for i in range(count)]


def _open(run: Path, records: list[dict]) -> list[Image.Image]:
    return [Image.open(run / r["file"]) for r in records]


def metric_node(cfg: DictConfig, name: str) -> DictConfig:
    """`metrics.<name>` of the config; a config composed for another command (scripts compose
    `sample`) has no `metrics`, and then the packaged conf/metrics/<name>.yaml is used."""
    nodes = cfg.get("metrics") or {}
    if name in nodes:
        return nodes[name]
    if name in group_options("metrics"):
        return OmegaConf.load(CONF_DIR / "metrics" / f"{name}.yaml")[name]
    accepted = ", ".join([*PAIRED, *PROMPTED, *group_options("metrics")])
    raise LbridgeError(f"unknown metric '{name}' in model.metrics (accepted: {accepted})")


def build_metric(cfg: DictConfig, name: str) -> tuple[Any, DictConfig]:
    """The metric object of `metrics.<name>` (errors name `metrics.<name>.*` keys) and its node."""
    node = metric_node(cfg, name)
    kwargs = OmegaConf.to_container(node, resolve=True)
    for key in EVAL_ONLY_KEYS:
        kwargs.pop(key, None)
    kwargs.setdefault("config_key", f"metrics.{name}")
    metric = instantiate_node(OmegaConf.create(kwargs), "metrics", label=name)
    if isinstance(metric, torch.nn.Module):
        metric = metric.to("cuda" if torch.cuda.is_available() else "cpu")
    return metric, node


def _values(name: str, result: Any) -> dict[str, float]:
    """compute() -> metrics.json entries: a scalar, (mean, std) as name and name_std, or a dict."""
    if isinstance(result, dict):
        return {k: float(v) for k, v in result.items()}
    if isinstance(result, tuple):
        return {name: float(result[0]), f"{name}_std": float(result[1])}
    return {name: float(result)}


class EvalInputs:
    """What metrics are fed: the run's images and prompts, the reference run's images, the run dir."""

    def __init__(self, run_dir: Path, records: list[dict], ref_dir: Path, reference: list[dict]):
        self.run_dir, self.records = run_dir, records
        self.images, self.ref_images = _open(run_dir, records), _open(ref_dir, reference)
        self.prompts = [r["prompt"] for r in records]


def compute_metric(cfg: DictConfig, name: str, inputs: EvalInputs) -> tuple[dict[str, float], str]:
    metric, node = build_metric(cfg, name)
    note = metric.description
    if metric.kind == "paired":
        metric.update(inputs.images, inputs.ref_images)
    elif metric.kind == "prompted":
        metric.update(inputs.images, inputs.prompts)
    elif metric.kind == "set":
        if node.get("reference"):
            real = image_dir(node.reference, f"metrics.{name}.reference")
            where = f"images in {node.reference}"
        else:
            real, where = inputs.ref_images, "the same-seed full-compute (method=none) images"
        metric.update_images(real, real=True)
        metric.update_images(inputs.images, real=False)
        note += f" (real set: {where})"
    elif metric.kind == "video":
        if any("video" not in r for r in inputs.records):
            raise LbridgeError(f"metric '{name}' needs video samples; model={cfg.model.name} makes images")
        metric.update([inputs.run_dir / r["video"] for r in inputs.records], inputs.prompts)
    return _values(name, metric.compute()), note


def run(cfg: DictConfig) -> Path:
    check_runtime(cfg)  # the run it evaluates is found by these options too
    if not distributed.world().main:
        # Under torchrun, eval runs on rank 0 alone: set metrics (FID, KID) need the whole set, and
        # reading images is cheap next to sampling them. The other ranks exit cleanly, having done nothing.
        return sample_dir(cfg)
    names = list(cfg.model.get("metrics", ["psnr", "ssim"]))
    for name in names:  # an unknown metric stops before any image is read
        if name not in PAIRED and name not in PROMPTED:
            metric_node(cfg, name)
    count = len(load_prompts(cfg.prompts, cfg.num_prompts, cfg.seed))
    run_dir, ref_dir = sample_dir(cfg), sample_dir(cfg, reference_method())
    records = load_records(run_dir, count, cfg.method.name)
    reference = load_records(ref_dir, count, "reference (method=none)")
    inputs = EvalInputs(run_dir, records, ref_dir, reference)

    flops_x, latency_x = speedups(records, reference)
    metrics: dict[str, Any] = {
        "model": cfg.model.name, "method": cfg.method.name,
        "ratio_target": float(cfg.ratio) if cfg.method.name != "none" else 1.0,
        "flops_speedup": flops_x, "latency_speedup": latency_x,
        "schedule": records[0]["schedule"], "num_samples": count,
    }  # fmt: skip
    if (peak := mean_peak_memory(records)) is not None:  # CUDA runs
        metrics["peak_mem_gb"] = peak
    notes = {}
    for name in names:
        if name in PAIRED:
            values = [PAIRED[name](a, b) for a, b in zip(inputs.images, inputs.ref_images, strict=True)]
            metrics[name] = mean(values) if all(math.isfinite(v) for v in values) else float("inf")
        elif name in PROMPTED:
            metrics[name] = PROMPTED[name](inputs.images, inputs.prompts)
        else:
            values, notes[name] = compute_metric(cfg, name, inputs)
            metrics.update(values)
    if notes:
        metrics["metric_notes"] = notes
    write_json(run_dir / "metrics.json", metrics)
    shown = {k: v for k, v in metrics.items() if k != "metric_notes"}
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()))
    return run_dir
