"""`lbridge reproduce table=<name>`: every row of a results table, end to end, into one directory.

A table spec (conf/table/<name>.yaml) lists rows as the overrides a user would type; each row is
`lbridge calibrate` (when its method calibrates), `lbridge sample` and `lbridge eval` of those
overrides, so any cell can be re-run alone. The full-compute reference runs first and its errors
stop the table at once (no GPU, no weights); a row that fails on its own (a ratio its method cannot
reach, a method lbridge does not have) stays in the table with the reason.

`dry_run=true` adds the spec's `dry_run` overrides: the same model classes at toy size with random
weights, random metric backbones, a few prompts, on CPU. It checks that the whole table runs; its
numbers mean nothing and it writes under output_root, never results/.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from lbridge.commands import sample
from lbridge.config import group_options
from lbridge.errors import LbridgeError
from lbridge.experiment import compose_config, run_row
from lbridge.report.grid import chunked, image_grids
from lbridge.report.pareto import pareto_plot
from lbridge.report.tables import write_table
from lbridge.runs import reference_method, sample_dir

REFERENCE_LABEL = "full compute"
REQUIRED = ("name", "title", "overrides", "rows", "columns")


def check_spec(spec: DictConfig) -> None:
    missing = [key for key in REQUIRED if key not in spec]
    if missing:
        raise LbridgeError(f"table spec '{spec.get('name')}' lacks {', '.join(missing)} (conf/table/*.yaml)")
    for row in spec.rows:
        if "label" not in row or "overrides" not in row:
            raise LbridgeError(f"table {spec.name}: every row needs `label` and `overrides`, got {dict(row)}")


def expand_rows(spec: DictConfig) -> list[dict[str, Any]]:
    """Spec rows as runs: a row with `ratios` becomes one run per ratio (`ratio=R` appended)."""
    runs = []
    for row in OmegaConf.to_container(spec.rows, resolve=True):
        for ratio in row.get("ratios") or [None]:
            extra = [] if ratio is None else [f"ratio={ratio}"]
            label = row["label"] if ratio is None else f"{row['label']} r{ratio}"
            runs.append(
                {**row, "run_label": label, "ratio_target": ratio, "overrides": row["overrides"] + extra}
            )
    return runs


def overrides_of(
    spec: DictConfig, row: dict[str, Any], dry_run: bool, output_root: str, extra: list[str] = ()
) -> list[str]:
    """The table's, the row's, (dry run's), then the user's `overrides=[...]`: later ones win."""
    overrides = [*spec.overrides, *row["overrides"], f"output_root={output_root}"]
    if dry_run:
        overrides += [*spec.get("dry_run", {}).get("overrides", []), *row.get("dry_run", [])]
    return [*overrides, *extra]


def method_of(overrides: list[str]) -> str:
    """The method a row's overrides select (the last `method=` wins, as in Hydra)."""
    chosen = [o.split("=", 1)[1] for o in overrides if o.startswith("method=")]
    return chosen[-1] if chosen else "fora"


def preflight(spec: DictConfig, dry_run: bool) -> None:
    """Stop before anything runs when the table cannot run here at all."""
    if dry_run or not spec.get("needs_gpu", False) or torch.cuda.is_available():
        return
    raise LbridgeError(
        f"table {spec.name} ({spec.title}) needs a CUDA GPU (none is visible here) and the model's weights "
        f"(model.path=/local/dir or Hugging Face hub access); `lbridge reproduce table={spec.name} "
        f"dry_run=true` (make target: DRY_RUN=1) runs the whole table on tiny random-weight pipelines on CPU"
    )


def run_reference(spec: DictConfig, dry_run: bool, output_root: str, extra: list[str]) -> DictConfig:
    """The full-compute run every row is compared with; errors here (weights, GPU) end the table."""
    row = {"overrides": ["method=none"]}
    cfg = compose_config("sample", overrides_of(spec, row, dry_run, output_root, extra))
    sample.run(cfg)
    return cfg


def measure(
    spec: DictConfig, runs: list[dict], dry_run: bool, output_root: str, extra: list[str]
) -> list[dict[str, Any]]:
    eval_overrides = [*spec.get("eval_overrides", [])]
    if dry_run:
        eval_overrides += spec.get("dry_run", {}).get("eval_overrides", [])
    results = []
    for run in runs:
        overrides = overrides_of(spec, run, dry_run, output_root, extra)
        name = method_of(overrides)
        result: dict[str, Any] = {
            "row": run["run_label"],
            "method": name,
            "ratio_target": run["ratio_target"],
        }
        if name not in group_options("method"):  # listed as such, never faked
            results.append({**result, "note": f"method '{name}' is not implemented in lbridge yet"})
            continue
        measured, cfg = run_row(run["run_label"], overrides, eval_overrides, keys=None)
        measured.pop("method"), measured.pop("overrides")
        results.append(
            {**result, **measured, "run_dir": str(sample_dir(cfg)) if "note" not in measured else None}
        )
    return results


def paper_columns(spec: DictConfig, runs: list[dict]) -> pd.DataFrame:
    """`paper_<column>` values and `paper_source` per row, from the spec's `paper:` entries."""
    rows = []
    for run in runs:
        paper = dict(run.get("paper") or {})
        source = paper.pop("source", None)
        rows.append({"paper_source": source, **{f"paper_{k}": v for k, v in paper.items()}})
    return pd.DataFrame(rows)


def assemble(spec: DictConfig, runs: list[dict], results: list[dict]) -> pd.DataFrame:
    measured = pd.DataFrame(results)
    wanted = ["row", "method", "ratio_target", *spec.columns, "schedule", "calibrate_s", "note"]
    columns = [c for c in wanted if c in measured.columns and measured[c].notna().any()]
    paper = paper_columns(spec, runs)
    paper = paper[[c for c in paper.columns if paper[c].notna().any()]]
    return pd.concat([measured[columns], paper], axis=1)


def regenerate_command(spec: DictConfig, dry_run: bool) -> str:
    """The table's make target (`regenerate:`) or the reproduce command; a dry run says it is one."""
    command = spec.get("regenerate") or f"lbridge reproduce table={spec.name}"
    if not dry_run:
        return command
    return command + (" DRY_RUN=1" if command.startswith("make ") else " dry_run=true")


def caption(spec: DictConfig, dry_run: bool, notes: dict[str, str]) -> str:
    text = f"**{spec.title}**" + (
        " — DRY RUN: toy random-weight models, the numbers mean nothing" if dry_run else ""
    )
    text += f"\n\nRegenerate: `{regenerate_command(spec, dry_run)}`.\n"
    text += "".join(f"- `{name}`: {note}\n" for name, note in notes.items())
    sources = spec.get("sources") or {}
    if sources:
        text += "\nPaper-reported numbers (`paper_*` columns; blank: the source does not report it):\n"
        text += "".join(f"- `{key}`: {citation}\n" for key, citation in sources.items())
    return text + (f"\n{spec.note.strip()}\n" if spec.get("note") else "") + "\n"


def metric_notes(results: list[dict]) -> dict[str, str]:
    """What each metric is (backbone, weights, formula), from the first evaluated row."""
    for result in results:
        if result.get("run_dir"):
            return json.loads((Path(result["run_dir"]) / "metrics.json").read_text()).get("metric_notes", {})
    return {}


def grid_layout(spec: DictConfig, reference: Path, results: list[dict]) -> list[list[tuple[str, Path]]]:
    """`grid.by: row`: the reference then every row, six a line; `by: method`: a line per method."""
    done = [(r["row"], Path(r["run_dir"]), r["method"]) for r in results if r.get("run_dir")]
    if spec.get("grid", {}).get("by", "row") == "method":
        lines: dict[str, list[tuple[str, Path]]] = {}
        for label, run, method in done:
            lines.setdefault(method, []).append((label, run))
        return [[(REFERENCE_LABEL, reference)], *lines.values()]
    return chunked([(REFERENCE_LABEL, reference), *[(label, run) for label, run, _ in done]])


def output_dir(cfg: DictConfig) -> Path:
    if cfg.out:
        return Path(cfg.out)
    if cfg.dry_run:
        return Path(cfg.output_root) / "reproduce" / f"{cfg.table.name}-dry-run"
    return Path(cfg.table.get("out") or Path("results") / cfg.table.name)


def run(cfg: DictConfig) -> Path:
    spec = cfg.table
    check_spec(spec)
    preflight(spec, cfg.dry_run)
    extra = list(cfg.overrides)
    reference = sample_dir(run_reference(spec, cfg.dry_run, cfg.output_root, extra), reference_method())
    runs = expand_rows(spec)
    results = measure(spec, runs, cfg.dry_run, cfg.output_root, extra)
    table = assemble(spec, runs, results)
    out = output_dir(cfg)
    regenerate = regenerate_command(spec, cfg.dry_run)
    text = caption(spec, cfg.dry_run, metric_notes(results))
    files = write_table(table, out, "table", text, regenerate, spec.title)
    pareto = spec.get("pareto", {"x": "flops_speedup", "y": "psnr"})
    footer = f"{spec.title}; regenerate: {regenerate}"
    plot = pareto_plot(table, out / "pareto.png", pareto["x"], pareto["y"], title=spec.title, footer=footer)
    grid = spec.get("grid", {})
    grids = image_grids(grid_layout(spec, reference, results), out / "grid", grid.get("num_prompts", 4),
                        grid.get("cell", 192))  # fmt: skip
    print(table.drop(columns=["schedule"], errors="ignore").to_string(index=False))
    written = [*files, *([plot] if plot else []), *grids]
    print(f"\nwritten: {', '.join(str(f) for f in written[:4])} and {len(grids)} grid(s) in {out / 'grid'}")
    return out
