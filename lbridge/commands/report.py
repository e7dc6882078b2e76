"""`lbridge report`: every evaluated run of a model in one table (csv, markdown, LaTeX), a speed-quality
Pareto plot (PSNR, or the first quality metric present, vs FLOPs speedup) and one image grid per
prompt (the full-compute image, then a line per method by increasing ratio)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig

from lbridge.errors import LbridgeError
from lbridge.io import read_jsonl
from lbridge.report.grid import image_grids
from lbridge.report.pareto import pareto_plot
from lbridge.report.tables import to_markdown, write_table
from lbridge.runs import FAILURES, MANIFEST

QUALITY = (
    "psnr",
    "image_reward",
    "clip_score",
    "vbench",
    "ssim",
    "digit_fid",
    "fid",
)  # Pareto y, first present
GRID_PROMPTS = 4

COLUMNS = ["method", "ratio_target", "flops_speedup", "latency_speedup"]
MEMORY = "peak_mem_gb"  # metrics.json of CUDA runs: mean peak memory per generation
NOTES = "metric_notes"  # metrics.json: what each metric is (backbone, weights, formula), for the caption


def metric_notes(root: Path, model: str) -> dict[str, str]:
    """Every evaluated run's metric notes, one line per metric (runs of one config agree)."""
    notes: dict[str, str] = {}
    for path in sorted((root / "sample" / model).glob("*/metrics.json")):
        for name, text in json.loads(path.read_text()).get(NOTES, {}).items():
            notes.setdefault(name, text)
    return notes


def runtime_of(run: Path) -> str:
    """The run's non-default `runtime.*` options ('' for none): compiled and eager runs of one method
    and ratio are two rows, and the table says which is which."""
    options = json.loads((run / MANIFEST).read_text()).get("key", {}).get("runtime", {})
    return " ".join(f"{name}={value}" for name, value in sorted(options.items()))


def gather(root: Path, model: str) -> pd.DataFrame:
    rows = []
    for path in sorted((root / "sample" / model).glob("*/metrics.json")):
        rows.append(
            {**json.loads(path.read_text()), "run": path.parent.name, "runtime": runtime_of(path.parent)}
        )
    if not rows:
        raise LbridgeError(f"no evaluated runs under {root / 'sample' / model}: run `lbridge eval` first")
    table = pd.DataFrame(rows)
    skip = {*COLUMNS, "model", "schedule", "run", "runtime", MEMORY, "num_samples", NOTES}
    metrics = [c for c in table.columns if c not in skip]
    runtime = ["runtime"] if table["runtime"].ne("").any() else []  # the column only when some run sets one
    memory = [MEMORY] if MEMORY in table else []  # CUDA runs: beside the speedups
    columns = [COLUMNS[0], *runtime, *COLUMNS[1:], *memory, *sorted(metrics)]
    return table[[*columns, "num_samples", "schedule", "run"]]


def series(table: pd.DataFrame) -> pd.Series:
    """A plot line / grid line per method and runtime: 'toca', 'toca [compile=True]'."""
    if "runtime" not in table:
        return table["method"]
    runtime = table["runtime"].fillna("")
    return table["method"] + runtime.map(lambda r: f" [{r}]" if r else "")


def ordered(table: pd.DataFrame) -> pd.DataFrame:
    """The full-compute reference first, then each method by increasing target ratio (the default
    runtime before the others)."""
    order = table["method"].ne("none").astype(int)
    keys = ["_order", "method", *(["runtime"] if "runtime" in table else []), "ratio_target"]
    return table.assign(_order=order).sort_values(keys, kind="stable").drop(columns="_order")


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


def grid_layout(root: Path, model: str, table: pd.DataFrame) -> list[list[tuple[str, Path]]]:
    """A line per method in table order (the full-compute reference first), runs by increasing ratio."""
    lines = []
    evaluated = table.dropna(subset=["run"])
    for line, rows in evaluated.groupby(series(evaluated), sort=False):
        method = rows["method"].iloc[0]
        labels = [f"full compute{line[len(method):]}" if method == "none" else f"{line} r{r:g}"
                  for r in rows["ratio_target"]]  # fmt: skip
        runs = [root / "sample" / model / run for run in rows["run"]]
        lines.append(list(zip(labels, runs, strict=True)))
    return lines


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
    command = f"lbridge report model={cfg.model.name} output_root={cfg.output_root}"
    command += (f" out={cfg.out}" if cfg.out else "") + (f" name={cfg.name}" if cfg.name != "table" else "")
    runs = f"{cfg.output_root}/sample/{cfg.model.name}"
    how = f"`{cfg.regenerate}`" if cfg.regenerate else f"`lbridge sample`, `lbridge eval`, `{command}`"
    caption = f"Evaluated runs under {runs}; regenerate: {how}.\n\n"
    notes = metric_notes(root, cfg.model.name)
    caption += "".join(f"- `{name}`: {text}\n" for name, text in notes.items()) + ("\n" if notes else "")
    regenerate = cfg.regenerate or f"lbridge sample, lbridge eval, {command}"
    latex = f"{cfg.model.name}: {runs}"
    files = write_table(table.drop(columns="run"), out, cfg.name, caption, regenerate, latex)
    quality = next((q for q in QUALITY if q in table and table[q].notna().any()), None)
    if quality is not None:
        title = f"model={cfg.model.name}, {runs}"
        lines = table.assign(method=series(table))  # a line per method and runtime
        plot = pareto_plot(lines, out / f"{cfg.name}_pareto.png", "flops_speedup", quality, title=title,
                           footer=f"regenerate: {cfg.regenerate or command}")  # fmt: skip
        files += [plot] if plot else []
    grids = image_grids(grid_layout(root, cfg.model.name, table), out / f"{cfg.name}_grid", GRID_PROMPTS, 96)
    print(
        "".join(f"{name}: {text}\n" for name, text in notes.items()) + to_markdown(table.drop(columns="run"))
    )
    where = out / f"{cfg.name}_grid"
    print(f"\nwritten: {', '.join(str(f) for f in files)} and {len(grids)} image grid(s) in {where}")
    return out
