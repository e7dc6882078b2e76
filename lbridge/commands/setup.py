"""Turning a composed config into the objects a command works with."""

from __future__ import annotations

import math
from typing import Any

from omegaconf import DictConfig

from lbridge.api import Accelerator
from lbridge.config import instantiate_node
from lbridge.errors import LbridgeError
from lbridge.methods.base import CacheMethod
from lbridge.models.base import ModelAdapter


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


def plan(pipe: Any, adapter: ModelAdapter, method: CacheMethod, cfg: DictConfig, prompt: str) -> Accelerator:
    """Measure costs and solve the schedule (raises before anything is written); left detached."""
    accelerator = Accelerator(pipe, method, adapter)
    accelerator.plan(
        target_ratio(cfg),
        {**adapter.prompt_kwargs(pipe, prompt), **adapter.pipeline_kwargs()},
        warmup=int(cfg.schedule.warmup),
        spacing=str(cfg.schedule.spacing),
        interval=cfg.schedule.interval,
    )
    return accelerator
