"""One row of a results table: calibrate (when the method needs it), sample, evaluate -> a dict.

The scripts that regenerate `results/` compose their configs with the same overrides a user types,
so every row can be reproduced on the command line with `lbridge calibrate|sample|eval <overrides>`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pandas as pd
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from lbridge.commands import calibrate, sample
from lbridge.commands import eval as evaluate
from lbridge.commands.setup import build_method
from lbridge.config import CONF_DIR
from lbridge.errors import LbridgeError
from lbridge.runs import calibration_dir, sample_dir

METRICS = ("flops_speedup", "latency_speedup", "psnr", "ssim", "digit_accuracy")


def compose_config(command: str, overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(command, overrides)


def run_row(label: str, overrides: list[str]) -> tuple[dict[str, Any], DictConfig]:
    """Calibrate if needed, sample and evaluate; a ratio the method cannot reach becomes a `note`."""
    cfg = compose_config("sample", overrides)
    row: dict[str, Any] = {"method": label, "overrides": " ".join(overrides)}
    calibrated = hasattr(build_method(cfg.method), "calibrate")
    try:
        if calibrated:
            calibrate.run(cfg)
        sample.run(cfg)
        evaluate.run(cfg)
    except LbridgeError as err:  # e.g. a ratio above what the method can reach on this model
        print(f"{label} {overrides}: {err}", file=sys.stderr)
        return {**row, "note": str(err).split(";")[0]}, cfg
    metrics = json.loads((sample_dir(cfg) / "metrics.json").read_text())
    row.update({k: metrics[k] for k in METRICS if k in metrics})
    row["schedule"] = metrics["schedule"]
    if calibrated:
        row["calibrate_s"] = json.loads((calibration_dir(cfg) / "calibration.json").read_text())["wall_s"]
    return row, cfg


def write_table(out: Path, name: str, rows: list[dict], caption: str, regenerate: str) -> pd.DataFrame:
    """`out/name.csv` and `out/name.md` (caption, how to regenerate, the table)."""
    out.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame(rows)
    table.to_csv(out / f"{name}.csv", index=False, float_format="%.4f")
    text = f"{caption}\n\nRegenerate: {regenerate}\n\n"
    (out / f"{name}.md").write_text(text + table.to_markdown(index=False, floatfmt=".3f") + "\n")
    print(table.to_string())
    return table
