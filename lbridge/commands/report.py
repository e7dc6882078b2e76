"""`lbridge report`: every evaluated run of a model in one table (pandas -> csv and markdown)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig

from lbridge.errors import LbridgeError

COLUMNS = ["method", "ratio_target", "flops_speedup", "latency_speedup"]


def gather(root: Path, model: str) -> pd.DataFrame:
    rows = []
    for path in sorted((root / "sample" / model).glob("*/metrics.json")):
        rows.append({**json.loads(path.read_text()), "run": path.parent.name})
    if not rows:
        raise LbridgeError(f"no evaluated runs under {root / 'sample' / model}: run `lbridge eval` first")
    table = pd.DataFrame(rows)
    metrics = [c for c in table.columns if c not in {*COLUMNS, "model", "schedule", "run", "num_samples"}]
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
    (out / "table.md").write_text(caption + markdown + "\n")
    print(markdown)
    print(f"\nwritten: {out / 'table.csv'}, {out / 'table.md'}")
    return out
