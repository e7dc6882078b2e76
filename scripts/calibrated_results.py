"""Calibrated methods vs their training-free bases on the tiny model -> results/tiny/calibrated.*

Ratios 2-6, the same 20 held-out prompts (seeds 0..19) for every row; calibrated methods (L2P, TCC,
LearniBridge) are fitted on 5 prompts with seeds 1000-1004. Quality is PSNR/SSIM against the
same-seed full-compute reference. Writes the table, a Pareto plot (PSNR vs FLOPs speedup) and
tcc_iterative_vs_naive.md. Run with `make calibrated-results` (about 5 minutes on 2 CPU cores);
`python scripts/calibrated_results.py plot` redraws the plot from calibrated.csv.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from lbridge.cli import quiet_libraries  # noqa: E402
from lbridge.experiment import run_row, write_table  # noqa: E402

OUT = Path("results/tiny")
BASE = ["model=tiny", "num_prompts=20", "output_root=outputs"]
RATIOS = (2, 3, 4, 5, 6)
METHODS = [
    ("fora", ["method=fora"]),
    ("fora+tcc (naive)", ["method=tcc", "method.calibration.mode=naive"]),
    ("fora+tcc (iterative)", ["method=tcc"]),
    ("fora+tcc (iterative, reference target)", ["method=tcc", "method.calibration.target=reference"]),
    ("taylorseer", ["method=taylorseer"]),
    ("taylorseer+tcc (iterative)", ["method=tcc", "method.base=taylorseer"]),
    ("l2p", ["method=l2p"]),
    ("learnibridge", ["method=learnibridge"]),
]
REGENERATE = "`make calibrated-results` (scripts/calibrated_results.py)."


def table() -> pd.DataFrame:
    rows = []
    for ratio in RATIOS:
        for label, overrides in METHODS:
            row, _ = run_row(label, [*BASE, *overrides, f"ratio={ratio}"])
            rows.append({"ratio_target": ratio, **row})
    caption = (
        "Calibrated methods (L2P, TCC on FORA and TaylorSeer, LearniBridge) and their training-free bases "
        "on the tiny model: each method at the schedule reaching FLOPs ratio R, 20 held-out seeds, "
        "PSNR/SSIM vs the same-seed full-compute reference; calibration on 5 prompts (seeds 1000-1004). "
        "TaylorSeer is order 2. Empty metrics with a note: ratio not reachable by that method here. "
        "Plot: calibrated_pareto.png (PSNR vs FLOPs speedup)."
    )
    return write_table(OUT, "calibrated", rows, caption, REGENERATE)


def pareto(results: pd.DataFrame) -> None:
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for label, group in results.dropna(subset=["psnr"]).groupby("method", sort=False):
        group = group.sort_values("flops_speedup")
        style = "--" if "tcc" in label else "-"
        axis.plot(group["flops_speedup"], group["psnr"], style, marker="o", label=label)
    axis.set_xlabel("FLOPs speedup (x)")
    axis.set_ylabel("PSNR vs full compute (dB)")
    axis.set_title("tiny model, 20 held-out prompts")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.text(0.01, 0.01, "regenerate: make calibrated-results", fontsize=7, color="gray")
    figure.tight_layout()
    figure.savefig(OUT / "calibrated_pareto.png", dpi=120)


def tcc_comparison(results: pd.DataFrame) -> None:
    """Does the iterative prior beat the naive one, and by how much (PSNR dB, per ratio)?"""
    psnr = results.pivot(index="ratio_target", columns="method", values="psnr")
    rows = [
        {
            "ratio_target": ratio,
            "fora": psnr.loc[ratio, "fora"],
            "tcc naive": psnr.loc[ratio, "fora+tcc (naive)"],
            "tcc iterative": psnr.loc[ratio, "fora+tcc (iterative)"],
            "iterative - naive (dB)": psnr.loc[ratio, "fora+tcc (iterative)"]
            - psnr.loc[ratio, "fora+tcc (naive)"],
            "iterative - fora (dB)": psnr.loc[ratio, "fora+tcc (iterative)"] - psnr.loc[ratio, "fora"],
        }
        for ratio in psnr.index
    ]
    caption = (
        "TCC on FORA: iterative (trajectory-consistent) vs naive priors, PSNR in dB (from calibrated.csv)."
    )
    write_table(OUT, "tcc_iterative_vs_naive", rows, caption, REGENERATE)


def tcc_in_sample() -> None:
    """Is TCC's effect a question of generalisation? The same runs on the 5 calibration prompts themselves."""
    rows = []
    for label, overrides in [m for m in METHODS if m[0].startswith("fora")]:
        sample_on = ["model=tiny", "num_prompts=5", "seed=1000", "output_root=outputs", "ratio=3"]
        row, _ = run_row(label, [*sample_on, *overrides])
        rows.append({"prompts": "calibration (seeds 1000-1004)", **row})
    caption = (
        "TCC at ratio 3 sampled on its own 5 calibration prompts (seeds 1000-1004): in-sample, the priors "
        "are exactly the mean deviations of these prompts."
    )
    write_table(OUT, "tcc_in_sample", rows, caption, REGENERATE)


def main(parts: list[str]) -> None:
    if "table" in parts:
        results = table()
        pareto(results)
        tcc_comparison(results)
    if "plot" in parts:  # redraw from the committed table without rerunning anything
        pareto(pd.read_csv(OUT / "calibrated.csv", comment="#"))
    if "in_sample" in parts:
        tcc_in_sample()


if __name__ == "__main__":
    quiet_libraries()
    main(sys.argv[1:] or ["table", "in_sample"])
