"""One row of a results table: calibrate (when the method needs it), sample, evaluate -> a dict.

The scripts that regenerate `results/` compose their configs with the same overrides a user types,
so every row can be reproduced on the command line with `lbridge calibrate|sample|eval <overrides>`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from lbridge.commands import calibrate, sample
from lbridge.commands import eval as evaluate
from lbridge.commands.setup import build_method
from lbridge.config import CONF_DIR
from lbridge.errors import LbridgeError
from lbridge.methods.base import is_calibrated
from lbridge.report.tables import write_csv_md
from lbridge.runs import calibration_dir, sample_dir

METRICS = ("flops_speedup", "latency_speedup", "psnr", "ssim", "digit_accuracy")


def compose_config(command: str, overrides: list[str]) -> DictConfig:
    """`command`'s config with `overrides`, from scripts or from inside a running lbridge command."""
    if GlobalHydra.instance().is_initialized():  # inside `lbridge reproduce`: same config tree
        return compose(command, overrides)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(command, overrides)


def measured(metrics: dict[str, Any], keys: Sequence[str] | None) -> dict[str, Any]:
    """The numbers of a run's metrics.json: `keys` of them, or every number when `keys` is None."""
    if keys is None:
        return {k: v for k, v in metrics.items() if isinstance(v, int | float) and k != "ratio_target"}
    return {k: metrics[k] for k in keys if k in metrics}


def run_row(
    label: str,
    overrides: list[str],
    eval_overrides: Sequence[str] = (),
    keys: Sequence[str] | None = METRICS,
) -> tuple[dict[str, Any], DictConfig]:
    """Calibrate if needed, sample and evaluate; a ratio the method cannot reach becomes a `note`.

    `eval_overrides` go to `lbridge eval` only (metric options, e.g. `metrics.lpips.pnet_rand=true`)."""
    cfg = compose_config("sample", overrides)
    row: dict[str, Any] = {"method": label, "overrides": " ".join(overrides)}
    calibrated = is_calibrated(build_method(cfg.method))
    try:
        if calibrated:
            calibrate.run(cfg)
        sample.run(cfg)
        evaluate.run(compose_config("eval", [*overrides, *eval_overrides]))
    except LbridgeError as err:  # e.g. a ratio above what the method can reach on this model
        print(f"{label} {overrides}: {err}", file=sys.stderr)
        return {**row, "note": str(err).split(";")[0]}, cfg
    metrics = json.loads((sample_dir(cfg) / "metrics.json").read_text())
    row.update(measured(metrics, keys))
    row["schedule"] = metrics["schedule"]
    if calibrated:
        row["calibrate_s"] = json.loads((calibration_dir(cfg) / "calibration.json").read_text())["wall_s"]
    return row, cfg


def write_table(out: Path, name: str, rows: list[dict], caption: str, regenerate: str) -> pd.DataFrame:
    """`out/name.csv` and `out/name.md` (caption, how to regenerate, the table)."""
    table = pd.DataFrame(rows)
    write_csv_md(table, out, name, f"{caption}\n\nRegenerate: {regenerate}\n\n", regenerate.replace("`", ""))
    print(table.to_string())
    return table
