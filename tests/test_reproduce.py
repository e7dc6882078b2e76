"""`lbridge reproduce` / `make reproduce-*`: every row of a paper table, end to end, with the paper's numbers.

The real tables need a GPU and weights; their DRY_RUN runs the same rows on toy random-weight
pipelines of the same classes, on CPU - which is what these tests do.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from lbridge.cli import main
from lbridge.commands.reproduce import check_spec, expand_rows, overrides_of
from lbridge.config import CONF_DIR, group_options
from lbridge.experiment import compose_config
from lbridge.report.pareto import pareto_frontier

ROOT = Path(__file__).resolve().parents[1]
PAPER_TABLES = ["table1_flux", "table2_hunyuan", "table3_wan"]


def spec(name: str):
    return OmegaConf.load(CONF_DIR / "table" / f"{name}.yaml")


def reproduce(tmp_path: Path, *overrides: str) -> int:
    return main(["reproduce", *overrides, f"output_root={tmp_path / 'runs'}", f"out={tmp_path / 'table'}"])


@pytest.mark.parametrize("name", group_options("table"))
@pytest.mark.parametrize("dry_run", [False, True])
def test_every_row_of_every_table_composes_into_sample_and_eval_configs(name, dry_run):
    table = spec(name)
    check_spec(table)
    for row in expand_rows(table):
        overrides = overrides_of(table, row, dry_run, "outputs", ["seed=3"])
        cfg = compose_config("sample", overrides)
        assert cfg.method.name in group_options("method"), row["run_label"]
        assert cfg.seed == 3  # the user's `overrides=[...]` come last and win
        extra = [
            *table.get("eval_overrides", []),
            *(table.get("dry_run", {}).get("eval_overrides", []) if dry_run else []),
        ]
        compose_config("eval", [*overrides, *extra])


def test_paper_numbers_name_a_listed_source_and_only_columns_the_table_has():
    for name in PAPER_TABLES:
        table = spec(name)
        for row in table.rows:
            paper = dict(row.get("paper") or {})
            if paper:
                assert paper.pop("source") in table.sources, (name, row.label)
                assert set(paper) <= set(table.columns), (name, row.label)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_a_real_table_without_a_gpu_stops_at_once_and_names_the_dry_run(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        reproduce(tmp_path, "table=table1_flux")
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert "table table1_flux" in error and "needs a CUDA GPU" in error and "dry_run=true" in error
    assert "Traceback" not in error
    assert not (tmp_path / "runs").exists() and not (tmp_path / "table").exists()  # nothing ran


TARGETS = {"reproduce-table1": "table1_flux", "reproduce-table2": "table2_hunyuan",
           "reproduce-table3": "table3_wan", "reproduce-tiny": "tiny"}  # fmt: skip


@pytest.mark.parametrize("target,table", TARGETS.items())
def test_make_targets_run_their_table_and_dry_run_1_adds_dry_run_true(target, table):
    def command(*args: str) -> str:
        # Under `make test` the parent make's MAKEFLAGS/MAKELEVEL would add "Entering directory" lines.
        env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
        make = ["make", "--no-print-directory", "-n", "-W", ".venv/.installed", target, *args]
        out = subprocess.run(make, cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout
        return out.strip().splitlines()[-1]

    assert command().split()[-2:] == ["reproduce", f"table={table}"]
    assert command("DRY_RUN=1").split()[-3:] == ["reproduce", "dry_run=true", f"table={table}"]


def test_table1_dry_run_runs_every_row_and_writes_table_paper_columns_plot_and_grids(tmp_path):
    """`make reproduce-table1 DRY_RUN=1`: FluxPipeline at toy size, random weights, 2 prompts."""
    assert reproduce(tmp_path, "table=table1_flux", "dry_run=true") == 0
    out = tmp_path / "table"
    # The csv names how it was made, a dry run included, for whoever holds it without the markdown.
    assert (out / "table.csv").read_text().startswith("# regenerate: make reproduce-table1 DRY_RUN=1\n")
    table = pd.read_csv(out / "table.csv", comment="#")
    assert list(table["row"]) == [row.label for row in spec("table1_flux").rows]
    measured = table.set_index("row")
    # Every row ran (no note), each accelerated row is cheaper than full compute, quality is measured.
    assert "note" not in table or table["note"].isna().all()
    accelerated = measured.drop(index="FLUX.1-dev (50 steps)")
    assert (accelerated["flops_speedup"] > 1.2).all()
    for column in ("image_reward", "clip_score", "psnr", "ssim", "lpips", "latency_speedup"):
        assert measured[column].notna().all(), column
    # The calibrated rows really calibrated.
    assert measured.loc[["L2P (N=5)", "LearniBridge (5.87x)"], "calibrate_s"].notna().all()
    # The paper's numbers sit in their own columns, with their source; LearniBridge's are blank.
    assert measured.loc["FORA (N=3)", "paper_image_reward"] == pytest.approx(0.9776)
    assert measured.loc["FORA (N=3)", "paper_source"] == "foca"
    assert measured.loc["L2P (N=5)", "paper_psnr"] == pytest.approx(31.459)
    assert pd.isna(measured.loc["LearniBridge (5.87x)", "paper_image_reward"])
    markdown = (out / "table.md").read_text()
    assert "DRY RUN" in markdown and "`make reproduce-table1 DRY_RUN=1`" in markdown
    assert "arXiv 2508.16211" in markdown and "plumbing only" in markdown
    assert "\\toprule" in (out / "table.tex").read_text()
    assert (out / "pareto.png").stat().st_size > 0
    grids = sorted((out / "grid").glob("prompt_*.png"))
    assert [g.name for g in grids] == ["prompt_0000.png", "prompt_0001.png"]


@pytest.mark.parametrize("name", ["table2_hunyuan", "table3_wan"])
def test_video_tables_dry_run_every_row(name, tmp_path):
    assert reproduce(tmp_path, f"table={name}", "dry_run=true") == 0
    table = pd.read_csv(tmp_path / "table" / "table.csv", comment="#")
    assert list(table["row"]) == [row.label for row in spec(name).rows]
    assert "note" not in table or table["note"].isna().all()  # every row ran
    assert table["psnr"].notna().all() and table["lpips"].notna().all()


def test_a_row_whose_method_lbridge_lacks_or_cannot_reach_is_listed_with_the_reason(tmp_path):
    rows = (
        'table.rows=[{label:fora,overrides:["method=fora"],ratios:[2]},'
        '{label:someday,overrides:["method=someday"]},'
        '{label:magcache,overrides:["method=magcache"],ratios:[6]}]'
    )
    assert reproduce(tmp_path, "table=tiny", "dry_run=true", rows) == 0
    table = pd.read_csv(tmp_path / "table" / "table.csv", comment="#").set_index("row")
    assert table.loc["fora r2", "flops_speedup"] > 2 and pd.isna(table.loc["fora r2", "note"])
    assert table.loc["someday", "note"] == "method 'someday' is not implemented in lbridge yet"
    assert "above the maximum" in table.loc["magcache r6", "note"]
    assert table.loc[["someday", "magcache r6"], "psnr"].isna().all()  # never faked


def test_pareto_frontier_keeps_the_points_no_other_beats_on_speed_and_quality():
    points = pd.DataFrame({"x": [2, 3, 4, 3, 5], "y": [40, 35, 30, 20, 31]})
    assert pareto_frontier(points, "x", "y")[["x", "y"]].values.tolist() == [[2, 40], [3, 35], [5, 31]]
    # Lower is better (LPIPS, FID): (3, 20) now beats (2, 40) and (3, 35).
    lower = pareto_frontier(points, "x", "y", higher_is_better=False)
    assert lower[["x", "y"]].values.tolist() == [[3, 20], [4, 30], [5, 31]]


def test_rows_with_ratios_expand_to_one_run_per_ratio():
    table = OmegaConf.create({"rows": [{"label": "fora", "overrides": ["method=fora"], "ratios": [2, 3]},
                                       {"label": "ref", "overrides": ["method=none"]}]})  # fmt: skip
    runs = expand_rows(table)
    assert [(r["run_label"], r["overrides"]) for r in runs] == [
        ("fora r2", ["method=fora", "ratio=2"]),
        ("fora r3", ["method=fora", "ratio=3"]),
        ("ref", ["method=none"]),
    ]
