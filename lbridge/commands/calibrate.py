"""`lbridge calibrate`: fit a method's parameters on collected trajectories."""

from __future__ import annotations

from omegaconf import DictConfig

from lbridge.commands.setup import build_method
from lbridge.errors import LbridgeError


def run(cfg: DictConfig) -> None:
    method = build_method(cfg.method)
    calibrate = getattr(method, "calibrate", None)
    if calibrate is None:
        raise LbridgeError(
            f"method '{cfg.method.name}' is training-free: it has nothing to calibrate "
            "(calibrated methods define `calibrate`)"
        )
    calibrate(cfg)
