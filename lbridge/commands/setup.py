"""Turning a composed config into the objects a command works with."""

from __future__ import annotations

import math
from typing import Any

import torch._dynamo
from omegaconf import DictConfig

from lbridge.api import Accelerator
from lbridge.config import instantiate_node
from lbridge.errors import LbridgeError
from lbridge.methods.base import CacheMethod
from lbridge.models.base import ModelAdapter
from lbridge.runtime.compile import CompiledRegions
from lbridge.runtime.modulation import check_modulation

#: torch.compile backends named in the error for an unknown one (any dynamo backend is accepted).
COMMON_BACKENDS = ("inductor", "cudagraphs", "eager", "aot_eager")


def build_adapter(cfg: DictConfig) -> ModelAdapter:
    return instantiate_node(cfg.model, "model")


def build_method(method_cfg: DictConfig) -> CacheMethod:
    return instantiate_node(method_cfg, "method")


def target_ratio(cfg: DictConfig) -> float:
    try:
        ratio = float(cfg.ratio)
    except (TypeError, ValueError):
        raise LbridgeError(f"ratio={cfg.ratio} is not a number (accepted: a number >= 1)") from None
    if not math.isfinite(ratio):
        raise LbridgeError(f"ratio={ratio:g} is not a finite number (accepted: a number >= 1)")
    if ratio < 1:
        raise LbridgeError(f"ratio={ratio:g} must be >= 1 (1 = full compute)")
    return ratio


def check_runtime(cfg: DictConfig) -> None:
    """`runtime.*`, checked before a model is loaded or anything is written."""
    runtime = cfg.runtime
    check_modulation(runtime.modulation, "runtime.modulation")
    if not runtime.compile:
        return
    if runtime.compile_backend not in torch._dynamo.list_backends(exclude_tags=()):
        raise LbridgeError(
            f"unknown runtime.compile_backend '{runtime.compile_backend}' (accepted: "
            f"{', '.join(COMMON_BACKENDS)}, or any name in torch._dynamo.list_backends())"
        )


def compiled(acc: Accelerator, cfg: DictConfig) -> CompiledRegions:
    """The planned accelerator with its regions compiled when `runtime.compile` says so; install it
    with `.installed()` (compiled forwards, then the hooks)."""
    return CompiledRegions(acc, bool(cfg.runtime.compile), backend=str(cfg.runtime.compile_backend))


def plan(
    pipe: Any,
    adapter: ModelAdapter,
    method: CacheMethod,
    cfg: DictConfig,
    prompt: str,
    modulation: str = "per_step",
) -> Accelerator:
    """Measure costs and solve the schedule (raises before anything is written); left detached.

    `modulation`: `runtime.modulation` for `sample`; the other commands compute per step (a
    calibration serves every runtime)."""
    accelerator = Accelerator(pipe, method, adapter, modulation)
    accelerator.plan(
        target_ratio(cfg),
        {**adapter.prompt_kwargs(pipe, prompt), **adapter.pipeline_kwargs()},
        warmup=int(cfg.schedule.warmup),
        spacing=str(cfg.schedule.spacing),
        interval=cfg.schedule.interval,
    )
    return accelerator
