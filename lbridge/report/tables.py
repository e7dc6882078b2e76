"""One table, three files: csv (exact values), markdown (caption + table), LaTeX (booktabs tabular).

Each file is replaced whole (`atomic_write_bytes`): a run killed while writing, or a copy taken
meanwhile (scripts/gpu_run.sh hands files back as they change), sees the old file or the new one.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from lbridge.io import atomic_write_bytes


def _blank_missing(table: pd.DataFrame) -> pd.DataFrame:
    """Object columns with None where a cell has no value, so markdown/LaTeX show a blank, not "nan"."""
    return table.astype(object).where(table.notna(), None)


def to_markdown(table: pd.DataFrame) -> str:
    return _blank_missing(table).to_markdown(index=False, floatfmt=".3f", missingval="")


def to_latex(table: pd.DataFrame, caption: str) -> str:
    styler = table.style.hide(axis="index").format(precision=3, na_rep="")
    # LaTeX special characters in labels ("N=3", "l=1.2", "%") must not break the document.
    styler = styler.format_index(escape="latex", axis=1).format(precision=3, na_rep="", escape="latex")
    return styler.to_latex(hrules=True, caption=caption.replace("\n", " "), position_float="centering")


def write_csv_md(table: pd.DataFrame, out: Path, name: str, caption: str, regenerate: str) -> list[Path]:
    """`out/name.csv` (exact values) and `out/name.md` (`caption`, then the table).

    The csv's first line says how it was made, for whoever holds the csv without the markdown.
    """
    out.mkdir(parents=True, exist_ok=True)
    csv, md = out / f"{name}.csv", out / f"{name}.md"
    write_csv(table, csv, regenerate)
    atomic_write_bytes(md, (caption + to_markdown(table) + "\n").encode())
    return [csv, md]


def write_csv(table: pd.DataFrame, path: Path, regenerate: str) -> None:
    """The exact values, after a `# regenerate: <command>` line (`pd.read_csv(..., comment="#")`)."""
    text = f"# regenerate: {regenerate}\n" + table.to_csv(index=False, float_format="%.4f")
    atomic_write_bytes(path, text.encode())


def write_table(
    table: pd.DataFrame, out: Path, name: str, caption: str, regenerate: str, latex_caption: str = ""
) -> list[Path]:
    """`out/name.{csv,md,tex}`; the markdown starts with `caption` (how it was made, what the metrics are)."""
    tex = out / f"{name}.tex"
    files = write_csv_md(table, out, name, caption, regenerate)
    atomic_write_bytes(tex, (to_latex(table, latex_caption or name) + "\n").encode())
    return [*files, tex]
