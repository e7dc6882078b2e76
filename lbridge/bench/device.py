"""Names of the timing device, for result headers and file names."""

from __future__ import annotations

import os
import platform
import re
import time
from collections.abc import Callable
from pathlib import Path

import torch


def device_name(device: torch.device) -> str:
    """The accelerator's or the CPU's model name, and the cores torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = re.findall(r"model name\s*:\s*(.+)", cpuinfo.read_text())
        model = names[0].strip() if names else model
    return f"{model}, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads)"


def synchronised_clock(cuda: bool) -> Callable[[], float]:
    """Seconds now, to time the work between two readings: this process's CPU time on CPU (steady on
    shared cores), wall time after a synchronise on CUDA (the work queued so far done)."""
    if not cuda:
        return time.process_time

    def now() -> float:
        torch.cuda.synchronize()
        return time.perf_counter()

    return now


def default_config(device: torch.device) -> str:
    """The config the speed benchmark runs unless told: FLUX.1-dev on CUDA, its CPU-size layout elsewhere."""
    return "flux-dev" if device.type == "cuda" else "flux-medium"


def file_stem(device: torch.device, config: str | None = None) -> str:
    """`cpu`, or the CUDA device's name in lower-case words joined by '-'; then `-<config>` for any
    config but the device's default, so a run of another config never overwrites the default's files."""
    stem = "cpu"
    if device.type == "cuda":
        stem = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")
    return stem if config in (None, default_config(device)) else f"{stem}-{config}"
