"""What `lbridge calibrate` hands a calibrated method: the planned pipeline and its training data."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from lbridge.api import Accelerator
from lbridge.calibration.trajectories import Trajectory
from lbridge.errors import LbridgeError
from lbridge.models.base import ModelAdapter
from lbridge.prompts import Prompt
from lbridge.runtime.schedule import Schedule

METADATA = "calibration.json"  # written last into an artifact directory: its presence means complete


@dataclass
class CalibrationJob:
    """A method fits its parameters for `accelerator.schedule` on the full-compute `trajectories`."""

    cfg: DictConfig
    adapter: ModelAdapter
    pipe: Any
    accelerator: Accelerator  # planned for the method being calibrated; detached
    prompts: list[Prompt]  # the calibration prompts, in the order of `trajectories`
    trajectories: list[Trajectory]

    @property
    def schedule(self) -> Schedule:
        return self.accelerator.schedule

    @property
    def transformer(self) -> torch.nn.Module:
        return self.adapter.transformer(self.pipe)

    def option(self, key: str, default: Any) -> Any:
        """A key of the method's `calibration:` node."""
        return self.cfg.method.get("calibration", {}).get(key, default)


def read_calibration(directory: Path, method: str, schedule: Schedule | None = None) -> dict[str, Any]:
    """An artifact's metadata; a clear error naming the command to run when there is none, or when
    it was calibrated for another schedule than `schedule`."""
    path = directory / METADATA
    if not path.is_file():
        raise LbridgeError(
            f"no {method} calibration at {directory}: run `lbridge calibrate` with the same model, "
            "method, ratio and schedule first"
        )
    metadata = json.loads(path.read_text())
    if schedule is not None and metadata.get("schedule") != str(schedule):
        raise LbridgeError(
            f"{directory} was calibrated for schedule {metadata.get('schedule')}, not {schedule}: "
            "calibrate again with the same model, ratio and schedule"
        )
    return metadata


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    """{"model": {"name": "tiny"}} -> {"model.name": "tiny"}: differences named as overrides are."""
    if isinstance(value, dict) and value:
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flat(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: value}


def check_artifact(directory: Path, key: dict[str, Any], key_hash: str) -> None:
    """Refuse an artifact made for another config: one copied or moved into this config's directory
    (artifact directories are named by the hash of their key, so only a hand-made copy mismatches).

    The error names what differs, e.g. `ratio=4.0 (this run: 3.0)`, `model.name=flux (this run: tiny)`.
    """
    path = directory / METADATA
    if not path.is_file():
        return  # read_calibration says which command to run
    try:
        metadata = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise LbridgeError(f"{path} is not valid JSON: delete {directory} and calibrate again") from None
    if metadata.get("hash") == key_hash:
        return
    stored, wanted = _flat(metadata.get("key") or {}), _flat(key)
    first = ("model.name", "method.name", "ratio")  # the usual culprits lead, then the rest by name
    keys = sorted(
        stored.keys() | wanted.keys(), key=lambda k: (k not in first, first.index(k) if k in first else 0, k)
    )
    differ = [k for k in keys if stored.get(k) != wanted.get(k)]
    shown = ", ".join(f"{k}={stored.get(k)} (this run: {wanted.get(k)})" for k in differ[:4])
    raise LbridgeError(
        f"{directory} holds a calibration for another config ({shown or 'unknown key'}): "
        "run `lbridge calibrate` with this config"
    )
