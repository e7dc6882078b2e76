"""Speed-quality Pareto plot: one line per method through its (speedup, quality) points."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display (CI, clusters)
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

LABELS = {
    "flops_speedup": "FLOPs speedup (x)",
    "latency_speedup": "latency speedup (x)",
    "psnr": "PSNR vs full compute (dB)",
    "ssim": "SSIM vs full compute",
    "lpips": "LPIPS vs full compute (lower is better)",
    "image_reward": "ImageReward",
    "clip_score": "CLIP score",
    "digit_fid": "digit-classifier FID (lower is better)",
    "digit_accuracy": "digit-classifier accuracy",
}


def pareto_frontier(points: pd.DataFrame, x: str, y: str, higher_is_better: bool = True) -> pd.DataFrame:
    """The points no other point beats on both speed (x) and quality (y), by increasing x."""
    sign = 1 if higher_is_better else -1
    ordered = points.sort_values([x, y], ascending=[False, not higher_is_better])
    best, keep = float("-inf"), []
    for index, row in ordered.iterrows():
        if sign * row[y] > best:
            best = sign * row[y]
            keep.append(index)
    return points.loc[keep].sort_values(x)


def pareto_plot(
    table: pd.DataFrame, path: Path, x: str, y: str, group: str = "method", title: str = "", footer: str = ""
) -> Path | None:
    """Each `group`'s points (finite x and y) as a line; the frontier over all of them dashed.

    Returns None (and writes nothing) when no row has both values, e.g. a table of failed rows."""
    points = table[[group]].assign(**{c: pd.to_numeric(table[c], errors="coerce") for c in (x, y)})
    # A row without a value (unreachable ratio) or with PSNR inf (the reference) is no point.
    points = points[points[[x, y]].abs().lt(float("inf")).all(axis=1)]
    if points.empty:
        return None
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for label, rows in points.groupby(group, sort=False):
        rows = rows.sort_values(x)
        axis.plot(rows[x], rows[y], marker="o", label=str(label))
    lower_better = y in ("lpips", "digit_fid", "fid", "kid")
    frontier = pareto_frontier(points, x, y, higher_is_better=not lower_better)
    axis.plot(frontier[x], frontier[y], ":", color="black", alpha=0.6, label="Pareto frontier")
    axis.set_xlabel(LABELS.get(x, x))
    axis.set_ylabel(LABELS.get(y, y))
    axis.set_title(title, fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    if footer:
        figure.text(0.01, 0.01, footer, fontsize=6, color="gray")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
