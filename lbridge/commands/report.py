"""`lbridge report`: every evaluated run of a model in one table (pandas -> csv and markdown)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig

from lbridge.errors import LbridgeError
from lbridge.io import read_jsonl
from lbridge.runs import FAILURES

COLUMNS = ["method", "ratio_target", "flops_speedup", "latency_speedup"]
NOTES = "metric_notes"  # metrics.json: what each metric is (backbone, weights, formula), for the caption


def metric_notes(root: Path, model: str) -> dict[str, str]:
    """Every evaluated run's metric notes, one line per metric (runs of one config agree)."""
    notes: dict[str, str] = {}
    for path in sorted((root / "sample" / model).glob("*/metrics.json")):
        for name, text in json.loads(path.read_text()).get(NOTES, {}).items():
            notes.setdefault(name, text)
    return notes


def gather(root: Path, model: str) -> pd.DataFrame:
    rows = []
    for path in sorted((root / "sample" / model).glob("*/metrics.json")):
        rows.append({**json.loads(path.read_text()), "run": path.parent.name})
    if not rows:
        raise LbridgeError(f"no evaluated runs under {root / 'sample' / model}: run `lbridge eval` first")
    table = pd.DataFrame(rows)
    skip = {*COLUMNS, "model", "schedule", "run", "num_samples", NOTES}
    metrics = [c for c in table.columns if c not in skip]
    return table[[*COLUMNS, *sorted(metrics), "num_samples", "schedule"]]


def ordered(table: pd.DataFrame) -> pd.DataFrame:
    """The full-compute reference first, then each method by increasing target ratio."""
    order = table["method"].ne("none").astype(int)
    return table.assign(_order=order).sort_values(["_order", "method", "ratio_target"]).drop(columns="_order")


def failed_jobs(root: Path, model: str) -> pd.DataFrame:
    """Sweep jobs of `model` that stopped with an error (an unreachable ratio, say): the first error of
    each (method, ratio), so a failed `calibrate` explains the `sample` that then had no calibration."""
    rows = [
        {"method": r["method"], "ratio_target": r["ratio"], "note": r["error"]}
        for r in read_jsonl(root / FAILURES)
        if r["command"] in ("calibrate", "sample") and r["model"] == model
    ]
    rows = pd.DataFrame(rows, columns=["method", "ratio_target", "note"])
    return rows.drop_duplicates(subset=["method", "ratio_target"], keep="first")


def run(cfg: DictConfig) -> Path:
    root = Path(cfg.output_root)
    table = gather(root, cfg.model.name)
    failed = failed_jobs(root, cfg.model.name)
    evaluated = set(zip(table["method"], table["ratio_target"], strict=True))
    missing = [pair not in evaluated for pair in zip(failed["method"], failed["ratio_target"], strict=True)]
    if any(missing):  # listed in the table, not silently absent
        table = pd.concat([table, failed[missing]], ignore_index=True)
    table = ordered(table)
    out = Path(cfg.out) if cfg.out else Path(cfg.output_root) / "report" / cfg.model.name
    out.mkdir(parents=True, exist_ok=True)
    csv, md = out / f"{cfg.name}.csv", out / f"{cfg.name}.md"
    table.to_csv(csv, index=False, float_format="%.4f")
    # Blank, not "nan", where a row has no value (the reference's note, an unreachable row's metrics).
    markdown = (
        table.astype(object)
        .where(table.notna(), None)
        .to_markdown(index=False, floatfmt=".3f", missingval="")
    )
    command = f"lbridge report model={cfg.model.name} output_root={cfg.output_root}"
    command += (f" out={cfg.out}" if cfg.out else "") + (f" name={cfg.name}" if cfg.name != "table" else "")
    runs = f"{cfg.output_root}/sample/{cfg.model.name}"
    how = f"`{cfg.regenerate}`" if cfg.regenerate else f"`lbridge sample`, `lbridge eval`, `{command}`"
    caption = f"Evaluated runs under {runs}; regenerate: {how}.\n\n"
    notes = metric_notes(root, cfg.model.name)
    caption += "".join(f"- `{name}`: {text}\n" for name, text in notes.items()) + ("\n" if notes else "")
    md.write_text(caption + markdown + "\n")
    print("".join(f"{name}: {text}\n" for name, text in notes.items()) + markdown)
    print(f"\nwritten: {csv}, {md}")
    return out
