"""`lbridge report`: every evaluated run of a model in one table (pandas -> csv and markdown)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig

from lbridge.errors import LbridgeError

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
    table = table[[*COLUMNS, *sorted(metrics), "num_samples", "schedule"]]
    # The full-compute reference first, then each method by increasing target ratio.
    order = table["method"].ne("none").astype(int)
    return table.assign(_order=order).sort_values(["_order", "method", "ratio_target"]).drop(columns="_order")


def run(cfg: DictConfig) -> Path:
    table = gather(Path(cfg.output_root), cfg.model.name)
    out = Path(cfg.out) if cfg.out else Path(cfg.output_root) / "report" / cfg.model.name
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "table.csv", index=False, float_format="%.4f")
    markdown = table.to_markdown(index=False, floatfmt=".3f")
    command = f"lbridge report model={cfg.model.name}" + (f" out={cfg.out}" if cfg.out else "")
    runs = f"{cfg.output_root}/sample/{cfg.model.name}"
    caption = f"Evaluated runs under {runs}; regenerate: `lbridge sample`, `lbridge eval`, `{command}`.\n\n"
    notes = metric_notes(Path(cfg.output_root), cfg.model.name)
    caption += "".join(f"- `{name}`: {text}\n" for name, text in notes.items()) + ("\n" if notes else "")
    (out / "table.md").write_text(caption + markdown + "\n")
    print("".join(f"{name}: {text}\n" for name, text in notes.items()) + markdown)
    print(f"\nwritten: {out / 'table.csv'}, {out / 'table.md'}")
    return out
