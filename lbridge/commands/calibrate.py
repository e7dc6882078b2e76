"""`lbridge calibrate`: fit a calibrated method's parameters for the schedule of a ratio.

The calibration prompts are `method.calibration.num_prompts` prompts of the prompt set with seeds
from `method.calibration.seed` (1000 by default, so `lbridge sample`'s seeds 0, 1, ... are held
out). Their full-compute trajectories are read from `lbridge collect`'s store, and collected there
first when missing. The artifact directory is written whole or not at all (temporary directory,
then rename), and an existing one is reused.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from omegaconf import DictConfig

from lbridge import distributed
from lbridge.calibration.job import METADATA, CalibrationJob
from lbridge.calibration.trajectories import load_trajectories
from lbridge.commands.collect import collect_trajectories
from lbridge.commands.setup import build_adapter, build_method, plan, target_ratio
from lbridge.errors import LbridgeError
from lbridge.methods.base import is_calibrated
from lbridge.prompts import load_prompts
from lbridge.runs import calibration_dir, calibration_key, key_hash


def run(cfg: DictConfig) -> Path:
    if distributed.world().parallel:
        raise LbridgeError(
            "lbridge calibrate runs in one process (5 calibration prompts): launch it without "
            "torchrun/accelerate; collect, sample and eval are the data-parallel commands"
        )
    target_ratio(cfg)
    method = build_method(cfg.method)
    if not is_calibrated(method):
        raise LbridgeError(
            f"method '{cfg.method.name}' is training-free: it has nothing to calibrate "
            "(calibrated methods define `calibrate`)"
        )
    out = calibration_dir(cfg)
    if (out / METADATA).is_file():
        print(f"{out}: already calibrated (delete the directory to calibrate again)")
        return out
    adapter = build_adapter(cfg)
    options = cfg.method.get("calibration", {})
    prompts = load_prompts(cfg.prompts, options.get("num_prompts", 5), options.get("seed", 1000))
    pipe = adapter.load_pipeline()
    acc = plan(pipe, adapter, method, cfg, prompts[0].text)  # a bad ratio stops here, nothing written
    root, trajectories = None, []
    if getattr(method, "uses_trajectories", True):  # adaptive methods sample the prompts themselves
        root = collect_trajectories(
            cfg, adapter, pipe, prompts, options.get("seed", 1000), options.get("dtype", "auto")
        )
        trajectories = load_trajectories(
            root, [p.index for p in prompts], {"model": cfg.model.name, "steps": len(acc.schedule)}
        )
    job = CalibrationJob(cfg, adapter, pipe, acc, prompts, trajectories)

    start = time.perf_counter()
    report = method.calibrate(job)
    wall = time.perf_counter() - start
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    metadata = {
        "hash": key_hash(calibration_key(cfg)), "key": calibration_key(cfg), "model": cfg.model.name,
        "method": method.describe(), "ratio": float(cfg.ratio), "schedule": str(acc.schedule),
        "flops_ratio": report.get("flops_ratio", acc.flops_ratio),
        "trajectories": None if root is None else str(root),
        "prompts": [{"index": p.index, "prompt": p.text, "seed": p.seed} for p in prompts],
        "wall_s": wall, "fit": report,
    }  # fmt: skip
    method.save_calibration(tmp, job.transformer, metadata)
    tmp.replace(out)
    print(
        f"{out}: calibrated {cfg.method.name} for schedule {acc.schedule} "
        f"(FLOPs ratio {metadata['flops_ratio']:.2f}x) on {len(prompts)} prompts in {wall:.1f} s"
    )
    for line in report.get("summary", []):
        print(f"  {line}")
    return out
